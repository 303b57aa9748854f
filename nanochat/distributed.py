"""
torch.distributed from the environment (torchrun's RANK/WORLD_SIZE or Slurm's SLURM_PROCID/SLURM_NTASKS):
the rank and world, the CUDA device of a rank, the rendezvous, the process group's set-up and tear-down,
and print0 (rank 0 speaks). torch is imported inside the functions that use it.
"""
from __future__ import annotations

import importlib
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from nanochat.device import autodetect_device_type

if TYPE_CHECKING:
    import torch


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


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


def dist_active() -> bool:
    """Several ranks in an initialised process group (collectives then mean something)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(device: torch.device) -> torch.device:
    """Where a small control tensor (a flag, a verdict) is reduced: NCCL reduces on the GPU, gloo on the CPU."""
    import torch
    import torch.distributed as dist
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any (one collective, reached by every rank; the flag itself
    without torch.distributed). How ranks agree on a decision one of them may take alone: an
    out-of-memory error, a stop request, a trial past the deadline."""
    if not dist_active():
        return flag
    import torch
    import torch.distributed as dist
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
