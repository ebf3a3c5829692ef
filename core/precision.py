"""Which number format the network computes in, per device.

* CUDA: ``torch.autocast`` with float16 for prediction, and bfloat16 for
  training where the GPU supports it (else float16 with a ``GradScaler``).
* CPU: ``torch.autocast`` with bfloat16 only where the processor computes
  bf16 in hardware (AVX512-BF16 or AMX: Intel since Cooper Lake / Sapphire
  Rapids, AMD since Zen 4). There oneDNN's bf16 convolutions are faster than
  float32; measured on a 2-core AMD EPYC with AVX512-BF16, small preset: one
  training step (batch 2, patch 32 x 104 x 104) 666 -> 442 ms, the network
  over a 64 x 512 x 512 stack 7.5 -> 4.1 s (docs/benchmarks.md). Elsewhere
  bf16 is emulated and 14-30x slower (measured on an AVX2-only EPYC), so
  those CPUs stay in float32.

``EPISEG_CPU_BF16=0`` (or ``1``) in the environment overrides the detection.
"""

from __future__ import annotations

import functools
import os

import torch

from core.errors import ConfigError

ENV_OVERRIDE = "EPISEG_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """True where this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles).

    ``EPISEG_CPU_BF16=0`` / ``1`` overrides the answer.
    """
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if forced in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        return forced in ("1", "true", "yes", "on")
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and bool(fn()):
                return True
        except Exception:  # a private probe that changed or is missing in this build
            continue
    return False


@functools.lru_cache(maxsize=1)
def cpu_runs_bf16_convolutions() -> bool:
    """Whether oneDNN runs bfloat16 convolutions on this CPU at all.

    It needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT; an AVX2-only CPU refuses them
    (emulated bf16 autocast in training still runs there, slowly). Probed once
    with a 4 x 4 x 4 convolution.
    """
    x = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bfloat16)
    w = torch.zeros(1, 1, 3, 3, 3, dtype=torch.bfloat16)
    try:
        torch.ops.aten.mkldnn_convolution(x, w, None, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    except RuntimeError:
        return False
    return True


def check_cpu_bf16_network() -> None:
    """Raise a :class:`ConfigError` naming ``EPISEG_CPU_BF16`` when it forces a
    bfloat16 network on a CPU that cannot run bf16 convolutions (where
    oneDNN's own error would stop the prediction at the first tile)."""
    if not cpu_runs_bf16_convolutions():
        raise ConfigError(
            f"{ENV_OVERRIDE}={os.environ.get(ENV_OVERRIDE, '')} asks for a bfloat16 network, but "
            "this CPU cannot run bfloat16 convolutions (they need AVX-512 BW/VL/DQ or "
            f"AVX-NE-CONVERT). Unset {ENV_OVERRIDE} (EPISEG then picks float32 here) or set it to 0.")
