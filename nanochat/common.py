"""
Small shared utilities: the work directory, device and distributed setup, atomic writes,
peak-FLOPs table. Nothing here knows about Slurm or pipelines.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:      # the annotations only; at run time torch is imported where it is used
    import torch

# torch is imported inside the functions that use it: the orchestration (jobs/) reads this module
# for its file helpers and ConfigError, and a command line or a stage process that never touches a
# tensor (status, cancel, a noop stage) should not pay torch's import of a few seconds.


class ConfigError(ValueError):
    """Bad user input (a missing file, an unknown key, a mismatched checkpoint).
    Command lines turn it into one line on stderr and exit code 2."""


def get_base_dir() -> Path:
    """Where large artifacts live (data shards, tokenizer, checkpoints). On a cluster: a shared FS."""
    d = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same folder, fsync, then rename.
# A crash leaves either the old file or the new one, never half of one.

def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp_path) writes the whole file under a temporary name in the same folder; it is then
    fsynced and renamed over `path`. On any error the temporary file is removed and `path` is untouched.
    The file gets the mode a plain open() would give (0666 less the umask): on a shared work
    directory a team's umask decides who can read run files, not this helper (mkstemp's 0600 would).
    An OSError (a full disk, a read-only folder) names the file it could not write."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    except OSError as e:
        raise _naming(e, path, None) from None
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, path, tmp) from None
        raise
    return path


def _create_temporary(path: Path) -> str:
    """A new empty file beside `path`, created with mode 0666 so that the umask applies."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _naming(e: OSError, path: Path, tmp: str | None) -> OSError:
    """An OSError whose message names a path: `path` where the error named none or only the
    temporary file (ENOSPC from write() names no file at all)."""
    if e.filename is not None and os.fspath(e.filename) != tmp:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else OSError(f"{path}: {e}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# -----------------------------------------------------------------------------
# Devices and torch.distributed

def autodetect_device_type() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class DistInfo:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _env_rank_info(env=None):
    """(rank, local rank, world size): RANK/LOCAL_RANK/WORLD_SIZE from torchrun, or
    SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS from srun. Half a description (RANK without
    WORLD_SIZE, a rank outside the world) is an error, not a silent single process."""
    env = os.environ if env is None else env
    if ("RANK" in env) != ("WORLD_SIZE" in env):
        raise RuntimeError("torch.distributed environment incomplete: RANK and WORLD_SIZE must be set together "
                           f"(RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r})")
    if "RANK" in env:
        rank, local_rank, world = int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"])
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, local_rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    else:
        return 0, 0, 1
    if not 0 <= rank < world:
        raise RuntimeError(f"torch.distributed environment inconsistent: rank {rank} is not in a world of {world}")
    return rank, local_rank, world


def local_cuda_index(local_rank: int, device_count: int) -> int:
    """The CUDA device a rank uses on its node. A site that binds one GPU per task (gres binding,
    CUDA_VISIBLE_DEVICES set per task) shows every task a single device, numbered 0, whatever its
    SLURM_LOCALID; a site that does not shows every task all the node's GPUs. The local rank modulo
    the visible count is right in both cases (cuda:{local_rank} fails in the first); a local rank past
    several visible GPUs is an error (two ranks on one GPU), not a wrap-around."""
    if device_count < 1:
        raise RuntimeError("no CUDA device is visible to this process (CUDA_VISIBLE_DEVICES?)")
    if device_count > 1 and local_rank >= device_count:
        # all the node's GPUs visible and more tasks than GPUs: two ranks would share one and NCCL fails later
        raise RuntimeError(f"local rank {local_rank} on a node with {device_count} visible GPUs: more tasks per node "
                           f"than GPUs (set tasks_per_node <= gpus_per_node)")
    return local_rank % device_count


def compute_init(device_type: str | None = None, seed: int = 42) -> DistInfo:
    """Seed, pick the device, and join the process group if the environment describes one
    (torchrun or Slurm). NCCL on CUDA, gloo on CPU."""
    import torch
    import torch.distributed as dist
    device_type = device_type or autodetect_device_type()
    torch.manual_seed(seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank, local_rank, world_size = _env_rank_info()
    ddp = world_size > 1
    if device_type == "cuda":
        index = local_cuda_index(local_rank, torch.cuda.device_count()) if ddp else torch.cuda.current_device()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        # torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is
        # imported. Imported after init (torch._dynamo pulls it in lazily: torch.compile, or the
        # meta-device model build) it pins the default process group, so destroy_process_group()
        # leaves gloo's worker threads running into interpreter shutdown, where one that releases
        # the last all-reduce's tensors aborts the process ("terminate called without an active
        # exception", exit -6). Imported first, the defaults are None.
        importlib.import_module("torch.distributed.nn.functional")
        # Ranks from srun (no torchrun): the job decides where to meet. A MASTER_ADDR/MASTER_PORT
        # inherited from the shell (or process) that submitted the job names some other rendezvous,
        # and every job submitted from it would collide on that one port.
        from_srun = "RANK" not in os.environ and "SLURM_JOB_ID" in os.environ
        if from_srun or "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _slurm_master_addr()
        if from_srun or "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(rendezvous_port(os.environ.get("SLURM_JOB_ID", "")))
        backend = "nccl" if device_type == "cuda" else "gloo"
        # A bounded wait: a rank whose peer died (a node lost mid-run) fails its collective after
        # this long instead of the default 30 min (gloo), so the stage FAILS and can be resumed.
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=dist_timeout(),
                                **({"device_id": device} if device_type == "cuda" else {}))
    return DistInfo(ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def dist_timeout() -> timedelta:
    """How long a collective (and the rendezvous) may wait for the other ranks:
    NANOCHAT_DIST_TIMEOUT_S seconds, default 600."""
    raw = os.environ.get("NANOCHAT_DIST_TIMEOUT_S", "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RuntimeError(f"NANOCHAT_DIST_TIMEOUT_S: {raw!r} is not a positive number of seconds")
    return timedelta(seconds=seconds)


# MASTER_PORT from the Slurm job id: 20000 + id mod 10000, below Linux's ephemeral range
# (32768-60999) so no outgoing connection holds it. Two jobs on one node share a port only when
# their ids differ by a multiple of 10000 and both still run there.
RENDEZVOUS_PORT_BASE, RENDEZVOUS_PORT_SPAN = 20000, 10000


def rendezvous_port(job_id: str | int) -> int:
    digits = "".join(ch for ch in str(job_id).split("_")[0] if ch.isdigit())
    return RENDEZVOUS_PORT_BASE + (int(digits) if digits else 0) % RENDEZVOUS_PORT_SPAN


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist ("gpu[07-09,12],cpu1" -> "gpu07"), for machines without
    scontrol; scontrol is asked first (it is what Slurm itself uses)."""
    depth, head = 0, ""
    for ch in nodelist.strip():
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _slurm_master_addr() -> str:
    """The rendezvous host: the job's first node as `scontrol show hostnames $SLURM_JOB_NODELIST`
    lists it (every rank computes the same name). Without a node list there is no knowing where
    rank 0 runs: a one-line error instead of a guess that hangs the other nodes."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("torch.distributed environment incomplete: MASTER_ADDR is not set and there is no "
                           "SLURM_JOB_NODELIST to take the first node from (launch with srun/torchrun, or set MASTER_ADDR)")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return _first_host(nodelist)


def compute_cleanup() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
            from nanochat.gpu_monitor import nvml_clocks
            props = torch.cuda.get_device_properties(device)
            clocks = nvml_clocks(device.index if device.index is not None else torch.cuda.current_device()) or {}
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
        print0(f"{device_name(device)}: no peak FLOP/s known (not in nanochat.common.DEVICE_PEAKS, compute "
               f"capability not in TENSOR_FLOPS_PER_SM_CYCLE): MFU stays empty; set the stage's peak_flops")
    _peaks_cache[key] = out
    return out


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd or os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
