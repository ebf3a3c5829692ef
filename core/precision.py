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

import os

import torch

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
