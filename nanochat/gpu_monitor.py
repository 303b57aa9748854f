"""
GPU utilisation over a stretch of work (a stage), from NVML (the nvidia-ml-py package, `import pynvml`).

NVML's utilisation is the share of the last sample period (1/6 s to 1 s, by device) during which a
kernel was running on the GPU: what nvidia-smi shows as GPU-Util. A background thread reads it every
`interval_s` and the mean over the stage goes into the result row as `gpu_util_mean`.

On a CPU, without the NVML library (no driver), or without nvidia-ml-py there is nothing to read:
the sampler is not started and the mean is None (an empty cell), never a guess.
"""
from __future__ import annotations

import threading
from typing import Callable


class UtilSampler:
    """Calls read() every interval_s in a daemon thread between start() and stop(); stop() returns the
    mean of the readings (None when there were none). A reading of None (a failed read) is skipped.
    The first reading is taken at start and the last at stop, so even a short stage has two."""

    def __init__(self, read: Callable[[], float | None], interval_s: float = 0.5):
        self.read = read
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _take(self) -> None:
        try:
            value = self.read()
        except Exception:   # a flaky read must never take the stage down
            value = None
        if value is not None:
            self.samples.append(float(value))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> "UtilSampler":
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._take()
        self._thread = threading.Thread(target=self._loop, name="gpu-util-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float | None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._take()
        return self.mean

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def nvml_reader(cuda_index: int) -> tuple[Callable[[], float] | None, str]:
    """(read function giving the GPU utilisation in percent, "") for the CUDA device `cuda_index` of
    this process, or (None, why not). NVML numbers devices ignoring CUDA_VISIBLE_DEVICES, so the
    device is found by its UUID as torch reports it, by index only when nothing is hidden."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:   # pynvml.NVMLError_LibraryNotFound and friends: no driver here
        return None, f"NVML unavailable ({type(e).__name__})"
    try:
        handle = _nvml_handle(pynvml, cuda_index)
    except Exception as e:
        return None, f"no NVML handle for cuda:{cuda_index} ({type(e).__name__}: {e})"

    def read() -> float:
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    return read, ""


def nvml_clocks(cuda_index: int) -> dict | None:
    """What common.peaks_from_properties needs from NVML for this CUDA device: {"sm_clock_hz",
    "mem_clock_hz", "bus_width_bits", "memory_share"} (max clocks; a MIG slice reads its parent's
    clocks and bus, and memory_share is its share of the parent's memory), or None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = _nvml_handle(pynvml, cuda_index)
        share, full = 1.0, handle
        if pynvml.nvmlDeviceIsMigDeviceHandle(handle):
            full = pynvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
            share = pynvml.nvmlDeviceGetMemoryInfo(handle).total / pynvml.nvmlDeviceGetMemoryInfo(full).total
        return {"sm_clock_hz": pynvml.nvmlDeviceGetMaxClockInfo(full, pynvml.NVML_CLOCK_SM) * 1e6,
                "mem_clock_hz": pynvml.nvmlDeviceGetMaxClockInfo(full, pynvml.NVML_CLOCK_MEM) * 1e6,
                "bus_width_bits": pynvml.nvmlDeviceGetMemoryBusWidth(full), "memory_share": share}
    except Exception:   # no nvidia-ml-py, no driver, a call this driver lacks: no fallback figures
        return None


def _nvml_handle(pynvml, cuda_index: int):
    import os

    import torch
    uuid = str(getattr(torch.cuda.get_device_properties(cuda_index), "uuid", "") or "")
    if uuid:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        raise RuntimeError("torch gives no device UUID and CUDA_VISIBLE_DEVICES renumbers devices")
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


def start_gpu_sampler(device_type: str, cuda_index: int | None = None,
                      interval_s: float = 0.5) -> tuple[UtilSampler | None, str]:
    """A started sampler of this process's GPU for a stage on `device_type`, or (None, why not)."""
    if device_type != "cuda":
        return None, f"not a CUDA stage ({device_type})"
    import torch
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if cuda_index is None:
        from nanochat.distributed import _env_rank_info, local_cuda_index
        cuda_index = local_cuda_index(_env_rank_info()[1], torch.cuda.device_count())
    read, why = nvml_reader(cuda_index)
    if read is None:
        return None, why
    return UtilSampler(read, interval_s).start(), ""
