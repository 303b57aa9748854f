"""
What the CPU can do fast, decided in one place (Muon's Newton-Schulz dtype, the CPU decode precision,
bf16 autocast in CPU training all ask here). This project's machines differ: some Intel with AMX, some
AMD with AVX512-BF16, CI runners with neither; bf16 matmuls are fast only with those instructions and
are emulated (slower than fp32) without them.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 (what oneDNN/torch's CPU kernels use for bf16 matmuls)."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Intel AMX tiles: bf16 matrix-matrix products several times fp32's. Training on a CPU needs these
    to gain from bf16: with AVX512-BF16 alone, autocast's casts cost more than its matmuls save
    (bench train --compare-precision measured 0.53x on an AMD EPYC with AVX512-BF16, depth 4, 8 x 512)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
