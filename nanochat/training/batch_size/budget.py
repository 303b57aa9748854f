"""
A real memory budget on CPU: the search runs in a fresh interpreter whose address space is limited
(RLIMIT_AS) to the torch runtime's baseline plus the budget, so an allocation beyond it fails with the
CPU allocator's own error; the parent is unharmed. Address space bounds resident memory from above,
so a size found this way also stays within the budget in RSS.
"""
from __future__ import annotations

import gc
import os
import pickle
import resource
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from nanochat.device import device_total_memory
from nanochat.errors import ConfigError
from nanochat.training.batch_size.oom import is_oom_error
from nanochat.training.batch_size.options import SearchOptions
# Imported here, before the child sets its limit: the search and the trial step's imports (the data
# loader's pyarrow among them) map address space that is no trial's.
from nanochat.training.batch_size.search import SearchResult, search_on_model


def _vm_size_bytes(field: str = "VmSize") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


_CHILD_RSS_BASELINE = 0   # in the budget child: its resident size when the limit was set (trial peaks are above it)


def _warm_up_torch() -> None:
    # Start every intra-op thread (each maps an 8 MB stack) and autograd once, so they count in
    # the baseline rather than against the budget. The work must be large enough for torch and
    # the BLAS to go parallel: a small matmul runs on one thread and the pool starts later, inside
    # the budget, at a moment that varies from run to run.
    a = torch.randn(512, 512, requires_grad=True)
    (a @ a).relu().sum().backward()
    b = torch.randn(1 << 22)
    float((b * 2).exp().sum())
    del a, b
    gc.collect()


def _budget_child_main(payload_path: str, result_path: str, budget_bytes: int, threads: int) -> None:
    """Runs in the child process: set the address-space limit, then unpickle and run the job, so the
    model, optimizer state and activations all count against the budget."""
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        _warm_up_torch()
        baseline = _vm_size_bytes()
        global _CHILD_RSS_BASELINE
        _CHILD_RSS_BASELINE = _vm_size_bytes("VmRSS")
        payload = Path(payload_path).read_bytes()
        resource.setrlimit(resource.RLIMIT_AS, (baseline + budget_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))
        fn, args = pickle.loads(payload)
        del payload
        answer = ("ok", fn(*args), baseline)
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        kind = "config" if isinstance(e, ConfigError) else ("oom" if is_oom_error(e) else "error")
        answer = (kind, f"{type(e).__name__}: {e}", 0)
    resource.setrlimit(resource.RLIMIT_AS, resource.getrlimit(resource.RLIMIT_AS)[1:] * 2)
    Path(result_path).write_bytes(pickle.dumps(answer))


def run_under_memory_budget(fn, args: tuple, budget_gb: float, timeout_s: float | None = None, threads: int = 0):
    """Run fn(*args) in a child process limited to `budget_gb` of address space above the torch
    runtime's baseline. fn and args must pickle (module-level functions, models, dataclasses).
    A fresh interpreter (not fork: the parent's heap would count; not multiprocessing's spawn: it
    re-imports the caller's __main__, which breaks scripts without a main guard).
    Returns fn's result; a ConfigError in the child is raised as ConfigError, an out-of-memory
    as MemoryError, anything else as RuntimeError."""
    budget_bytes = int(budget_gb * 1024 ** 3)
    threads = threads or torch.get_num_threads()  # the child computes like this process does
    with tempfile.TemporaryDirectory(prefix="nanochat-budget-") as tmp:
        payload_path, result_path = os.path.join(tmp, "payload.pkl"), os.path.join(tmp, "result.pkl")
        try:
            payload = pickle.dumps((fn, args))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise TypeError(f"the memory-budget child needs picklable arguments (a module-level step_fn and "
                            f"optimizers_factory, not closures or lambdas): {e}") from None
        Path(payload_path).write_bytes(payload)
        del payload
        code = ("import sys; from nanochat.training.batch_size.budget import _budget_child_main; "
                "_budget_child_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))")
        env = dict(os.environ)
        # One malloc arena: glibc reserves 64 MB of address space per thread arena, which RLIMIT_AS
        # counts although nothing uses it; how many arenas a run creates varies with thread timing,
        # and the budget should measure memory the step uses, not that noise.
        env.setdefault("MALLOC_ARENA_MAX", "1")
        # A fixed mmap threshold (glibc's initial 128 KiB): every large block is mapped when allocated
        # and unmapped when freed. glibc otherwise raises the threshold after each large free, after
        # which such blocks come from a heap whose fragmentation depends on the allocation history,
        # and the same step's address-space peak varied by tens of MB from run to run.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        try:
            proc = subprocess.run([sys.executable, "-c", code, payload_path, result_path, str(budget_bytes), str(threads)],
                                  env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"memory-budget child gave no answer within {timeout_s} s") from None
        if not os.path.exists(result_path):
            raise RuntimeError(f"memory-budget child died without an answer (exit code {proc.returncode})")
        kind, value, _baseline = pickle.loads(Path(result_path).read_bytes())
    if kind == "ok":
        return value
    if kind == "config":
        raise ConfigError(value.split(": ", 1)[-1])
    if kind == "oom":
        raise MemoryError(value)
    raise RuntimeError(f"memory-budget child failed: {value}")


def budget_search_job(opts: SearchOptions, rows: int, deadline: float | None = None) -> SearchResult:
    """The search as the budget child runs it (opts: resolve's, with a CPU copy of the model and no
    compiled module: that lives in the parent)."""
    if opts.compile:
        # Inductor's worker pool would fork helpers under the same address-space limit; compile in-process.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    result = search_on_model(replace(opts, device=torch.device("cpu")), rows, deadline)
    result.memory_baseline = _CHILD_RSS_BASELINE
    return result


def default_cpu_budget_gb() -> float:
    """Half of the host's total memory: on CPU an unbounded search would end in the kernel's OOM
    killer rather than an exception, so the CPU probe always runs under some budget. Total, not
    available, memory: the budget is part of the cache key, and it must not drift from one job to
    the next (the probe stage fills the cache that the training stages read)."""
    return device_total_memory(torch.device("cpu")) / 1024 ** 3 / 2

