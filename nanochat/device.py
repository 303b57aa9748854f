"""
The device a process computes on: which type (autodetect), its name and memory, peak memory over a
stretch of work, synchronisation. torch is imported inside each function, so importing this module
costs nothing for code that never computes.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def autodetect_device_type() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def device_name(device: torch.device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_total_memory(device: torch.device) -> int:
    """Bytes of memory on the device; the host's RAM for CPU."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def synchronize(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory on CUDA; on CPU the peak resident set size of this process since the last
    reset_peak_memory() (Linux: VmHWM, which that reset lowers; elsewhere ru_maxrss, never reset)."""
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * 1024 if sys.platform != "darwin" else rss


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: what a batch-size probe's largest (failed) trial or an earlier benchmark mode
    allocated must not be reported as this stage's peak. CUDA: the allocator's peak statistics; CPU on
    Linux: the resident-set high-water mark (writing 5 to /proc/self/clear_refs); elsewhere nothing."""
    import torch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
