#!/usr/bin/env bash
# macOS: EpiSeg.app and a .dmg from packaging/episeg.spec.
# NOT run by this project yet (no Mac); see packaging/README.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/core/__init__.py")"
python3 -m venv "$ROOT/build/mac-venv"
"$ROOT/build/mac-venv/bin/pip" install torch "$ROOT[package]" pillow   # pillow: PNG -> .icns
EPISEG_VERSION="$VERSION" "$ROOT/build/mac-venv/bin/pyinstaller" --noconfirm \
    --distpath "$ROOT/dist" --workpath "$ROOT/build/mac-work" "$ROOT/packaging/episeg.spec"
"$ROOT/dist/EpiSeg/episeg-cli" --selftest
hdiutil create -volname EpiSeg -srcfolder "$ROOT/dist/EpiSeg.app" -ov -format UDZO \
    "$ROOT/dist/EpiSeg-$VERSION-macos-$(uname -m).dmg"
