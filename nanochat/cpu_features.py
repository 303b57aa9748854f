"""
What the CPU can do fast, decided in one place (Muon's Newton-Schulz dtype, the CPU decode precision,
bf16 autocast in CPU training, whether CPU training may compile all ask here). This project's machines differ: some Intel with AMX, some
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


@functools.lru_cache(maxsize=None)
def cpu_can_compile() -> bool:
    """torch.compile's CPU backend (inductor) writes C++ with SIMD intrinsics: it needs a C++ compiler
    and a vector instruction set it generates code for (AVX2, AVX512, NEON, ...). Without either it
    falls back to slow scalar code or fails, so a CPU run compiles only where both are present."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        get_cpp_compiler()  # raises when no C++ compiler is found
        return bool(pick_vec_isa())
    except Exception:
        return False
