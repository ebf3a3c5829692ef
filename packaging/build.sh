#!/usr/bin/env bash
# Build the EpiSeg desktop application for Linux and pack it as an archive.
#
#   packaging/build.sh            -> build/package/EpiSeg-<version>-linux-<arch>.tar.gz
#
# From a clean virtual environment (made here, nothing else on the machine is
# used): installs PyTorch, EpiSeg and PyInstaller, freezes packaging/episeg.spec
# into a one-folder app, checks it has no CUDA libraries when PyTorch is a CPU
# build, runs the frozen app's self-test from outside the source tree with an
# empty environment, and packs the folder with a launcher (.desktop file, icon).
#
# Settings (environment):
#   EPISEG_BUILD_DIR  where everything goes (default: build/package in the repository)
#   PYTHON            the Python that makes the virtual environment (default: python3)
#   EPISEG_TORCH      the PyTorch requirement (default: torch==2.13.0, the CPU build this
#                     project's machines keep on disk). Elsewhere, for a CPU-only build:
#                     EPISEG_TORCH=torch EPISEG_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
#   EPISEG_PIP_ARGS   extra pip arguments (an index, a wheel folder)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${EPISEG_BUILD_DIR:-$ROOT/build/package}"
PYTHON="${PYTHON:-python3}"
TORCH="${EPISEG_TORCH:-torch==2.13.0}"
read -r -a PIP_ARGS <<< "${EPISEG_PIP_ARGS:-}"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/core/__init__.py")"
NAME="EpiSeg-$VERSION-linux-$(uname -m)"
say() { printf '\n== %s\n' "$*"; }

if [ ! -f "$ROOT/resources/models/default.pt" ]; then
    echo "build.sh: resources/models/default.pt is missing; make it with" \
         "benchmarks/train_default_model.py" >&2
    exit 2
fi

mkdir -p "$BUILD"
BUILD="$(cd "$BUILD" && pwd)"
say "1/5 clean virtual environment in $BUILD/venv"
rm -rf "$BUILD/venv" "$BUILD/work" "$BUILD/dist" "$BUILD/stage"
"$PYTHON" -m venv "$BUILD/venv"
VPY="$BUILD/venv/bin/python"
# (grep: this machine's pip configuration warns about every missing local index)
"$VPY" -m pip install -q "${PIP_ARGS[@]}" "$TORCH" "$ROOT[package]" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
"$VPY" -c "import torch, PySide6, PyInstaller; print('torch', torch.__version__, '| PySide6', PySide6.__version__, '| PyInstaller', PyInstaller.__version__)"

say "2/5 PyInstaller (one folder)"
(cd "$BUILD" && "$VPY" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$BUILD/dist" --workpath "$BUILD/work" "$ROOT/packaging/episeg.spec")
APP="$BUILD/dist/EpiSeg"

say "3/5 checks: no CUDA libraries in a CPU build, no test programs"
if "$VPY" -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
    cuda="$(find "$APP" \( -name 'libcudnn*' -o -name 'libcublas*' -o -name 'libnccl*' \
            -o -name 'libcudart*' -o -name 'libnvrtc*' -o -name 'cudnn*.dll' \) | head -n 3)"
    if [ -n "$cuda" ]; then echo "CUDA libraries in a CPU build:" "$cuda" >&2; exit 1; fi
fi
if [ -d "$APP/_internal/torch/test" ] || [ -d "$APP/_internal/torch/include" ]; then
    echo "PyTorch's tests or headers were bundled" >&2; exit 1
fi

say "4/5 self-test of the frozen app (empty environment, outside the source tree)"
selftest_dir="$(mktemp -d)"
(cd "$selftest_dir" && env -i HOME="$selftest_dir" PATH=/usr/bin:/bin LANG=C.UTF-8 \
    "$APP/EpiSeg" --selftest)
rm -rf "$selftest_dir"

say "5/5 archive with a launcher"
STAGE="$BUILD/stage/$NAME"
mkdir -p "$STAGE"
cp -a "$APP" "$STAGE/EpiSeg"
cp "$ROOT/packaging/linux/episeg.desktop" "$ROOT/packaging/linux/install-launcher.sh" \
   "$ROOT/resources/icons/episeg.png" "$STAGE/"
cp "$ROOT/packaging/linux/README.txt" "$STAGE/README.txt"
chmod +x "$STAGE/install-launcher.sh"
ARCHIVE="$BUILD/$NAME.tar.gz"
tar -C "$BUILD/stage" -czf "$ARCHIVE.part" "$NAME"
mv "$ARCHIVE.part" "$ARCHIVE"
echo "archive   $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
echo "unpacked  $(du -sh "$STAGE" | cut -f1)"
