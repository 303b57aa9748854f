"""
Device facts that a CPU can check: the peak tables match exact device names, a rank picks a CUDA
device that exists where a site binds one GPU per task, and the package metadata asks for the torch
that the code needs.
"""
import re
from pathlib import Path

import pytest
import torch

from nanochat.distributed import _env_rank_info, local_cuda_index
from nanochat.peaks import DEVICE_PEAKS, peak_bandwidth, peak_flops

REPO = Path(__file__).resolve().parents[1]


# -----------------------------------------------------------------------------
# Peak tables: exact names, as torch.cuda.get_device_name() reports them

@pytest.mark.parametrize("name, flops, bandwidth", [
    ("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),      # SXM5
    ("NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("NVIDIA H100 NVL", 835e12, 3.9e12),             # was the SXM peak (substring "H100")
    ("NVIDIA H200", 989e12, 4.8e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),     # was 2.0 TB/s (substring "A100")
    ("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    ("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    ("NVIDIA L4", 121e12, 0.3e12),
    ("NVIDIA L40S", 362e12, 0.864e12),               # was the L4's bandwidth (substring "L4")
    ("NVIDIA L40", 181e12, 0.864e12),
])
def test_peaks_of_known_devices(name, flops, bandwidth):
    assert peak_flops(name) == flops
    assert peak_bandwidth(name) == bandwidth


@pytest.mark.parametrize("name", ["cpu", "mps", "NVIDIA H100", "H100", "NVIDIA A100", "Tesla V100-SXM2-16GB",
                                  "NVIDIA L4 (MIG)", "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "AMD Instinct MI300X", ""])
def test_unknown_devices_have_no_peak(name):
    # no entry -> MFU and bandwidth use stay empty instead of borrowing a relative's figure
    assert peak_flops(name) is None and peak_bandwidth(name) is None


def test_table_is_consistent():
    for name, (flops, bandwidth) in DEVICE_PEAKS.items():
        assert name.startswith("NVIDIA ") and name == name.strip()
        assert 50e12 <= flops <= 2500e12, name          # dense bf16, not the "with sparsity" figure
        assert 0.2e12 <= bandwidth <= 8e12, name
    # the same family, different parts: different figures
    assert peak_flops("NVIDIA H100 NVL") < peak_flops("NVIDIA H100 80GB HBM3")
    assert peak_bandwidth("NVIDIA L40S") != peak_bandwidth("NVIDIA L4")


# -----------------------------------------------------------------------------
# Devices not in the table: the CUDA properties (SMs, compute capability, NVML clocks), or a given peak

def test_peaks_from_properties_reproduce_the_data_sheets():
    from nanochat.peaks import peaks_from_properties
    # A100 SXM4 80GB: 108 SMs at 1410 MHz, HBM2e at 1593 MHz on 5120 bits
    flops, bandwidth = peaks_from_properties(8, 0, 108, 1410e6, 1593e6, 5120)
    assert flops == pytest.approx(312e12, rel=0.01) and bandwidth == pytest.approx(2.039e12, rel=0.01)
    # H100 SXM5: the maximum SM clock (1980 MHz) makes it an upper bound, within 10% of the sheet
    flops, bandwidth = peaks_from_properties(9, 0, 132, 1980e6, 2619e6, 5120)
    assert 989e12 <= flops <= 1.1 * 989e12 and bandwidth == pytest.approx(3.35e12, rel=0.01)
    # a MIG 1g.10gb slice of that A100: its 14 SMs, an eighth of the memory (and of its controllers)
    flops, bandwidth = peaks_from_properties(8, 0, 14, 1410e6, 1593e6, 5120, memory_share=1 / 8)
    assert flops == pytest.approx(312e12 * 14 / 108, rel=0.01) and bandwidth == pytest.approx(2.039e12 / 8, rel=0.01)
    assert peaks_from_properties(7, 0, 80, 1530e6, 877e6, 4096)[0] is None      # V100: no bf16 tensor cores
    assert peaks_from_properties(9, 0, 132, None, None, None) == (None, None)   # no NVML: nothing guessed


def test_device_peaks_order_config_then_table_then_cuda_properties(monkeypatch):
    import types
    from nanochat import gpu_monitor, peaks
    cpu = torch.device("cpu")
    assert peaks.device_peaks(cpu)["peak_flops"] is None                 # a CPU has no peak...
    given = peaks.device_peaks(cpu, 2e12, 5e10)                            # ...unless one is given
    assert given == {"peak_flops": 2e12, "peak_flops_source": "config", "peak_bandwidth": 5e10,
                     "peak_bandwidth_source": "config"}
    cuda = torch.device("cuda", 0)
    names = {"name": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(peaks, "_peaks_cache", {})
    monkeypatch.setattr(peaks, "device_name", lambda device: names["name"])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(major=9, minor=0, multi_processor_count=132))
    monkeypatch.setattr(gpu_monitor, "nvml_clocks", lambda index: {
        "sm_clock_hz": 1980e6, "mem_clock_hz": 2619e6, "bus_width_bits": 6144, "memory_share": 1.0})
    table = peaks.device_peaks(cuda)
    assert (table["peak_flops"], table["peak_flops_source"]) == (312e12, "table")
    names["name"] = "NVIDIA GH200 144G HBM3e"                               # not in the table
    peaks._peaks_cache.clear()                                             # (cached per device)
    fallback = peaks.device_peaks(cuda)
    assert fallback["peak_flops_source"] == fallback["peak_bandwidth_source"] == "cuda_properties"
    assert fallback["peak_flops"] == pytest.approx(132 * 4096 * 1980e6)
    assert fallback["peak_bandwidth"] == pytest.approx(2 * 2619e6 * 6144 / 8)
    mixed = peaks.device_peaks(cuda, flops_override=900e12)
    assert (mixed["peak_flops"], mixed["peak_flops_source"], mixed["peak_bandwidth_source"]) == \
        (900e12, "config", "cuda_properties")


# -----------------------------------------------------------------------------
# Which CUDA device a rank takes

@pytest.mark.parametrize("env, device_count, index", [
    # srun with one GPU bound per task: every task sees one device, cuda:0
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}, 1, 0),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, 1, 0),
    # srun without binding: every task sees the node's GPUs and takes its local id
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "3"}, 4, 3),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2"}, 4, 2),
    # torchrun
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}, 8, 5),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 0),
    # two tasks per node, two GPUs each bound to its task as a pair
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}, 2, 1),
])
def test_local_cuda_index_exists_on_the_node(env, device_count, index):
    _rank, local_rank, _world = _env_rank_info(env)
    got = local_cuda_index(local_rank, device_count)
    assert got == index
    assert 0 <= got < device_count


def test_more_local_ranks_than_visible_gpus_is_an_error_not_a_shared_gpu():
    with pytest.raises(RuntimeError, match="more tasks per node than GPUs"):
        local_cuda_index(2, 2)          # 4 tasks on a node showing its 2 GPUs: rank 2 would take cuda:0
    assert local_cuda_index(3, 1) == 0  # one GPU bound per task: fine


def test_no_visible_cuda_device_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        local_cuda_index(0, 0)


# -----------------------------------------------------------------------------
# The torch floor in the package metadata covers every torch API the library uses

# API (as it appears in the source) -> the first torch release that has it
TORCH_API_SINCE = {
    "enable_gqa": (2, 5),          # F.scaled_dot_product_attention(..., enable_gqa=)
    "flex_attention": (2, 5),      # torch.nn.attention.flex_attention
    "F.rms_norm": (2, 4),
    "device_id": (2, 3),           # dist.init_process_group(device_id=)
}


def _torch_floor() -> tuple[int, ...]:
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"torch>=([0-9.]+)"', text)
    assert m, "pyproject.toml: no torch>= floor in dependencies"
    return tuple(int(x) for x in m.group(1).split("."))


def test_torch_floor_covers_the_apis_the_code_uses():
    source = "\n".join(p.read_text() for p in sorted((REPO / "nanochat").glob("*.py")))
    source += "\n".join(p.read_text() for p in sorted((REPO / "jobs").glob("*.py")))
    used = {api: since for api, since in TORCH_API_SINCE.items() if api in source}
    assert "enable_gqa" in used
    need = max(used.values())
    assert _torch_floor() >= need, f"pyproject.toml asks for torch>={_torch_floor()}, the code needs {need}: {used}"
    assert f"torch {need[0]}.{need[1]}" in (REPO / "README.md").read_text()
