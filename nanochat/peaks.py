"""
Peak FLOP/s and memory bandwidth of a device, the denominators of MFU and bandwidth utilisation: a
user-given peak, then the table of known parts by exact name, then what a CUDA device says of itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from nanochat import gpu_monitor
from nanochat.device import device_name
from nanochat.distributed import print0

if TYPE_CHECKING:
    import torch


# Per device, as torch.cuda.get_device_name() reports it: (bf16 dense peak FLOP/s, memory bandwidth in
# bytes/s), from NVIDIA's data sheets (dense figures: the sheets quote bf16 "with sparsity", twice these).
# Names match exactly: one family spans parts with different peaks (H100 SXM / PCIe / NVL, A100 40GB /
# 80GB), and a substring match gave an L40S the L4's bandwidth. A name not here (a MIG slice is named
# after its parent plus its profile) takes device_peaks' fallback. V100 has no bf16 tensor cores.
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H200": (989e12, 4.8e12),              # H200 SXM 141GB
    "NVIDIA H200 NVL": (835e12, 4.8e12),
    "NVIDIA GH200 480GB": (989e12, 4.0e12),       # Grace Hopper, 96GB HBM3
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),   # H100 SXM5
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H100 NVL": (835e12, 3.9e12),          # 94GB, PCIe card with NVLink bridge
    "NVIDIA A100-SXM4-80GB": (312e12, 2.039e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.555e12),
    "NVIDIA A100 80GB PCIe": (312e12, 1.935e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 1.555e12),
    "NVIDIA L40S": (362e12, 0.864e12),
    "NVIDIA L40": (181e12, 0.864e12),
    "NVIDIA L4": (121e12, 0.3e12),
    "NVIDIA A10": (125e12, 0.6e12),
    "NVIDIA GeForce RTX 4090": (165e12, 1.008e12),  # bf16 with fp32 accumulate (what autocast uses)
    "NVIDIA GeForce RTX 3090": (71e12, 0.936e12),


    "NVIDIA H800": (989e12, 3.35e12),             # H100 SXM5's compute, export NVLink
    "NVIDIA H800 PCIe": (756e12, 2.0e12),
    "NVIDIA H20": (148e12, 4.0e12),               # capped tensor rate: the properties fallback would say 4x more
    "NVIDIA A800-SXM4-80GB": (312e12, 2.039e12),  # A100's compute, export NVLink
    "NVIDIA A800 80GB PCIe": (312e12, 1.935e12),
    "NVIDIA B200": (2250e12, 8.0e12),
}


def _device_peaks(name: str) -> tuple[float, float] | None:
    return DEVICE_PEAKS.get(name.strip())


def peak_flops(name: str) -> float | None:
    """bf16 dense peak FLOP/s of a device named as torch.cuda.get_device_name() names it; None if unknown."""
    peaks = _device_peaks(name)
    return peaks[0] if peaks else None


def peak_bandwidth(name: str) -> float | None:
    """Memory bandwidth (bytes/s) for the decode roofline; None if unknown."""
    peaks = _device_peaks(name)
    return peaks[1] if peaks else None


# The fallback for a CUDA device not in the table (GH200 variants, MIG slices, parts named otherwise):
# bf16 dense tensor-core FLOPs per SM per clock cycle by compute capability, from NVIDIA's architecture
# papers and the table's own parts (A100: 108 SMs x 1.41 GHz x 2048 = 312e12). GeForce parts of 8.6 and
# 8.9 do half that with the fp32 accumulation autocast uses (they are in the table by name). With the
# maximum SM clock from NVML this is an upper bound where a part is clocked lower under tensor load
# (H100 SXM: 1.07e15 against the sheet's 989e12), and wrong for parts whose tensor rate is capped (H20:
# in the table): a user-given peak (the `peak_flops` / `peak_bandwidth` keys) wins over both.
TENSOR_FLOPS_PER_SM_CYCLE = {(8, 0): 2048, (8, 6): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}


def peaks_from_properties(major: int, minor: int, sm_count: int, sm_clock_hz: float | None,
                          mem_clock_hz: float | None, bus_width_bits: int | None,
                          memory_share: float = 1.0) -> tuple[float | None, float | None]:
    """(bf16 dense FLOP/s, bytes/s) from what the device says of itself: SMs (a MIG slice's own count)
    x per-SM rate x SM clock, and the memory clock x 2 (double data rate) x bus width, times the slice's
    share of the memory (a MIG slice has that share of the memory controllers). None where unknown."""
    per_sm = TENSOR_FLOPS_PER_SM_CYCLE.get((major, minor))
    flops = per_sm * sm_count * sm_clock_hz if per_sm and sm_count and sm_clock_hz else None
    bandwidth = 2 * mem_clock_hz * bus_width_bits / 8 * memory_share if mem_clock_hz and bus_width_bits else None
    return flops, bandwidth


_peaks_cache: dict = {}


def device_peaks(device: torch.device, flops_override: float = 0.0, bandwidth_override: float = 0.0) -> dict:
    """The peaks MFU and bandwidth use are computed against, each with where it came from:
    {"peak_flops", "peak_flops_source", "peak_bandwidth", "peak_bandwidth_source"}, a source being
    "config" (a user-given peak > 0: wins anywhere, a CPU too), "table" (DEVICE_PEAKS, exact name),
    "cuda_properties" (peaks_from_properties with NVML's clocks) or None (unknown: the column stays empty)."""
    key = (str(device), flops_override, bandwidth_override)
    if key in _peaks_cache:
        return _peaks_cache[key]
    found = {"flops": (None, None), "bandwidth": (None, None)}
    if device.type == "cuda":
        table = _device_peaks(device_name(device))
        if table:
            found = {"flops": (table[0], "table"), "bandwidth": (table[1], "table")}
        else:
            import torch
            props = torch.cuda.get_device_properties(device)
            clocks = gpu_monitor.nvml_clocks(device.index if device.index is not None else torch.cuda.current_device()) or {}
            flops, bandwidth = peaks_from_properties(props.major, props.minor, props.multi_processor_count, **clocks)
            found = {"flops": (flops, "cuda_properties" if flops else None),
                     "bandwidth": (bandwidth, "cuda_properties" if bandwidth else None)}
    if flops_override > 0:
        found["flops"] = (float(flops_override), "config")
    if bandwidth_override > 0:
        found["bandwidth"] = (float(bandwidth_override), "config")
    out = {"peak_flops": found["flops"][0], "peak_flops_source": found["flops"][1],
           "peak_bandwidth": found["bandwidth"][0], "peak_bandwidth_source": found["bandwidth"][1]}
    if device.type == "cuda" and out["peak_flops"] is None:
        print0(f"{device_name(device)}: no peak FLOP/s known (not in nanochat.peaks.DEVICE_PEAKS, compute "
               f"capability not in TENSOR_FLOPS_PER_SM_CYCLE): MFU stays empty; set the stage's peak_flops")
    _peaks_cache[key] = out
    return out
