"""
Out-of-memory recognition: which errors are an allocation failure (a verdict on a batch size, so the
caller may retry smaller), and freeing what a failed step left behind.
"""
from __future__ import annotations

import gc

import torch

# Substrings of the messages that allocation failures carry. CUDA's caching allocator raises
# torch.OutOfMemoryError; kernels and libraries that allocate on their own raise RuntimeError.
OOM_MESSAGES = (
    "out of memory",                                 # "CUDA out of memory", "CUDA error: out of memory"
    "cublas_status_alloc_failed",                    # cuBLAS workspace allocation
    "cudnn_status_not_allocated",                    # cuDNN workspace allocation
    "cudnn_status_alloc_failed",
    "defaultcpuallocator: can't allocate memory",    # CPU allocator (e.g. under RLIMIT_AS)
    "std::bad_alloc",                                # C++ new failing inside an op
)


def is_oom_error(exc: BaseException) -> bool:
    """True for an allocation failure on any device (so the caller can retry smaller)."""
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(m in text for m in OOM_MESSAGES)
    return False


def free_memory(device: torch.device | None = None) -> None:
    """Drop what a failed or finished trial left behind so the next trial starts clean."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()

