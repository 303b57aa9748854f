"""
Automatic device batch size: find the largest per-device batch that trains without running out
of memory, keep a safety margin under it, and keep the configured total batch (tokens per optimizer
step) exact by choosing a device batch that divides it; gradient accumulation makes up the rest.

How it searches:
- A trial is one real training step (forward with full logits, backward, optimizer step with its
  state allocated) on the real model, at the stage's sequence length, autocast (bf16 on cuda) and
  compile setting. Weights are snapshotted to CPU before and restored after every trial, and the
  trial's optimizers are fresh ones from `optimizers_factory`, so the caller's model and optimizers
  end exactly as they were.
- Sizes grow 1, 2, 4, ... until a trial fails or the cap is reached, then a binary search between
  the last success and the first failure, stopped as soon as the final choice cannot change.
  The cap is ceil(R / (1 - margin)) where R = total_batch / (seq_len * world_size) rows per rank:
  a success there proves that R, the largest useful size, fits with the margin.
- Optionally (stop_gain) each success is timed, and growth stops when doubling the batch gains
  less than stop_gain in tokens/s: the largest batch is not always the fastest.
- With several ranks, every rank runs every trial and the verdicts are reduced (MIN on success,
  MAX on step time) in one collective per trial that every rank reaches whatever its outcome,
  so a rank that runs out of memory cannot deadlock the others and all ranks agree.
- On CPU the search runs under a real memory budget in a spawned child process: after importing
  torch and warming up its thread pools, the child measures its address-space size (VmSize) and
  sets RLIMIT_AS to that baseline plus the budget. The budget is therefore the address space the
  training step may add on top of the torch runtime (model, optimizer state, activations, logits);
  an allocation beyond it fails with the CPU allocator's real error. Address space bounds resident
  memory from above, so a size found this way also stays within the budget in RSS.

Results are cached per sha256 digest of everything that changes memory, one JSON file per key in
a shared folder (default <base_dir>/batch_size_cache), written atomically under a file lock.
If a real training step still runs out of memory, fallback_after_oom() halves the device batch,
multiplies gradient accumulation to keep the total exact, and records the smaller size in the cache.
"""
from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import pickle
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import Timeout

from nanochat.common import (ConfigError, atomic_write_json, autodetect_device_type, device_name,
                             device_total_memory, get_base_dir, peak_memory_bytes, print0)
from nanochat.locking import file_lock

# Bump when the trial step changes in a way that changes its memory: old cache entries stop matching.
STEP_VERSION = 1
DEFAULT_SAFETY_MARGIN = 0.15
DEFAULT_STOP_GAIN = 0.05

# -----------------------------------------------------------------------------
# Out-of-memory recognition

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


# -----------------------------------------------------------------------------
# Divisibility: the total batch is kept exact

def rows_per_rank(total_batch_size: int, seq_len: int, world_size: int) -> int:
    """Rows one rank processes per optimizer step (device_batch_size * grad_accum)."""
    if seq_len <= 0 or world_size <= 0 or total_batch_size <= 0:
        raise ConfigError(f"total_batch_size ({total_batch_size}), seq_len ({seq_len}) and world_size ({world_size}) must be positive")
    if total_batch_size % (seq_len * world_size):
        raise ConfigError(f"total_batch_size: {total_batch_size} tokens is not a multiple of seq_len x world_size "
                          f"= {seq_len} x {world_size}; no device batch keeps it exact")
    return total_batch_size // (seq_len * world_size)


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest d with d | n and d <= limit (0 when limit < 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 0


def kept_size(max_fit: int, safety_margin: float) -> int:
    """floor(max_fit * (1 - margin)), robust to float error (0.85 * 20 must be 17, not 16)."""
    return int(math.floor(max_fit * (1.0 - safety_margin) + 1e-9))


def search_cap(rows: int, safety_margin: float) -> int:
    """The largest size worth a trial: a success there proves `rows` fits with the margin."""
    return max(rows, int(math.ceil(rows / (1.0 - safety_margin) - 1e-9)))


def choose_device_batch(max_fit: int, rows: int, safety_margin: float, speed_cap: int | None = None) -> int:
    """The device batch kept from a largest fitting size: within the margin, at most the speed cap,
    and a divisor of the rows per rank. 0 when nothing fits."""
    if max_fit < 1:
        return 0
    target = kept_size(max_fit, safety_margin)
    if speed_cap is not None:
        target = min(target, speed_cap)
    # Size 1 ran a real step; with max_fit in 1..6 a 15% margin leaves nothing, so keep 1 rather than fail.
    return largest_divisor_at_most(rows, max(1, target))


# -----------------------------------------------------------------------------
# The trial step

@dataclass
class TrainStep:
    """The default trial step: the base/mid training step on random tokens (memory does not depend
    on the data). A dataclass, not a closure, so it can be pickled into the budget child."""
    seq_len: int
    vocab_size: int
    world_size: int = 1
    autocast_dtype: str | None = None  # "bfloat16" on cuda, None = no autocast

    def __call__(self, model, optimizers, batch_size: int) -> None:
        device = next(model.parameters()).device
        idx = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]
        ctx = (torch.autocast(device_type=device.type, dtype=getattr(torch, self.autocast_dtype))
               if self.autocast_dtype else nullcontext())
        with ctx:
            loss = model(x, y)
        loss.backward()
        del loss, x, y, idx
        if self.world_size > 1:
            reserve_gradient_bucket(model)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def reserve_gradient_bucket(model) -> None:
    """The training loop all-reduces gradients through one flat buffer (optim.all_reduce_gradients).
    A multi-rank trial allocates the same buffer, without the collective: a rank that fails
    mid-trial must not leave the others waiting in one (verdicts are reduced after the trial)."""
    bucket = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    del bucket


@dataclass
class DataSampleStep:
    """A trial step fed by the earlier fork's data_sample_fn(batch_size, seq_len) -> (inputs, targets)."""
    data_sample_fn: object
    seq_len: int

    def __call__(self, model, optimizers, batch_size: int) -> None:
        x, y = self.data_sample_fn(batch_size, self.seq_len)
        loss = model(x, y)
        loss.backward()
        del loss, x, y
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


@dataclass
class Trial:
    batch_size: int
    ok: bool
    seconds: float = 0.0           # time of the timed step(s) (max over ranks), 0 when not timed
    tokens_per_s: float | None = None
    error: str = ""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce_trial(status: int, seconds: float, device: torch.device) -> tuple[int, float]:
    """One collective per trial, reached by every rank whatever happened: status MAX (0 ok, 1 OOM,
    2 other error) and step time MAX (the slowest rank sets the pace)."""
    if not _dist_active():
        return status, seconds
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(status), seconds], dtype=torch.float64, device=comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()), float(t[1].item())


def _snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def _restore(model, snapshot: dict) -> None:
    for k, v in model.state_dict().items():
        v.copy_(snapshot[k])


def run_trial(model, optimizers_factory, step_fn, batch_size: int, seq_len: int, device: torch.device,
              snapshot: dict, compile: bool = False, timed_steps: int = 0) -> Trial:
    """One trial at batch_size: fresh optimizers, one step (allocates optimizer state; compiles),
    then max(timed_steps, 1) steady-state steps (timed when timed_steps > 0). Frees everything and restores the weights whatever happens.
    Under torch.distributed every rank must call it with the same batch_size."""
    status, error, seconds, failure = 0, "", 0.0, None
    trial_model = optimizers = None
    try:
        trial_model = model
        if compile and not hasattr(model, "_orig_mod"):
            # Recompiling for every size would hit dynamo's recompile limit and silently fall back to
            # eager (measuring the wrong memory), so each trial starts from a clean dynamo state.
            torch._dynamo.reset()
            trial_model = torch.compile(model, dynamic=False)
        optimizers = optimizers_factory(model)
        step_fn(trial_model, optimizers, batch_size)
        _synchronize(device)
        # The first step creates the optimizer state only after its backward; every later step holds
        # that state through forward and backward, so memory peaks there: at least one more step,
        # timed when asked for.
        t0 = time.perf_counter()
        for _ in range(max(timed_steps, 1)):
            step_fn(trial_model, optimizers, batch_size)
        _synchronize(device)
        if timed_steps > 0:
            seconds = (time.perf_counter() - t0) / timed_steps
    except Exception as e:  # noqa: BLE001 - an OOM is a verdict; anything else is re-raised below
        status = 1 if is_oom_error(e) else 2
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        if status == 2:
            failure = e
        else:
            e.__traceback__ = None  # the traceback pins the trial's tensors; drop it before freeing
    optimizers = trial_model = None
    model.zero_grad(set_to_none=True)
    _restore(model, snapshot)
    free_memory(device)
    if compile:
        torch._dynamo.reset()
    # Every rank reaches this collective, whatever its own trial did.
    status, seconds = _reduce_trial(status, seconds, device)
    if status == 2:
        if failure is not None:
            raise failure
        raise RuntimeError(f"another rank failed its trial at device batch size {batch_size} (not out of memory)")
    ok = status == 0
    if not ok and not error:
        error = "out of memory on another rank"
    tps = (batch_size * seq_len / seconds) if (ok and seconds > 0) else None
    return Trial(batch_size=batch_size, ok=ok, seconds=seconds, tokens_per_s=tps, error=error)


# -----------------------------------------------------------------------------
# The search

@dataclass
class SearchResult:
    device_batch_size: int
    grad_accum: int
    max_found: int              # largest size that ran (0: none)
    first_failure: int | None   # smallest size that failed (None: none failed)
    stopped_by_speed: bool
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def search_device_batch_size(trial_fn, rows: int, safety_margin: float = DEFAULT_SAFETY_MARGIN,
                             stop_gain: float | None = DEFAULT_STOP_GAIN, log=print0) -> SearchResult:
    """Exponential growth then binary search, on any `trial_fn(batch_size) -> Trial`.
    Kept apart from torch so the exact sequence of trials is easy to reason about and test."""
    if not 0.0 <= safety_margin < 1.0:
        raise ConfigError(f"safety_margin: {safety_margin} must be in [0, 1)")
    t_start = time.perf_counter()
    cap = search_cap(rows, safety_margin)
    trials: list[Trial] = []

    def attempt(bs: int) -> Trial:
        t = trial_fn(bs)
        trials.append(t)
        tps = f"{t.tokens_per_s:,.0f} tok/s" if t.tokens_per_s else ""
        log(f"auto batch size: trial {bs:5d} {'ok ' if t.ok else 'OOM'} {tps} {t.error if not t.ok else ''}".rstrip())
        return t

    lo, hi = 0, None          # largest success, smallest failure
    speed_cap = None
    prev: Trial | None = None
    bs = 1
    while True:
        t = attempt(bs)
        if not t.ok:
            hi = bs
            break
        lo = bs
        if stop_gain is not None and prev is not None and prev.tokens_per_s and t.tokens_per_s:
            if t.tokens_per_s < prev.tokens_per_s * (1.0 + stop_gain):
                speed_cap = prev.batch_size
                break
        prev = t
        if bs >= cap:
            break
        bs = min(bs * 2, cap)

    if lo == 0:
        raise ConfigError(f"device_batch_size: even 1 row of {rows} per rank does not fit in memory "
                          f"({trials[0].error}); use a smaller model, seq_len or a larger memory budget")

    # Binary search, stopped once every size left between lo and hi would give the same choice.
    if hi is not None and speed_cap is None:
        while hi - lo > 1 and choose_device_batch(lo, rows, safety_margin) != choose_device_batch(hi - 1, rows, safety_margin):
            mid = (lo + hi) // 2
            if attempt(mid).ok:
                lo = mid
            else:
                hi = mid

    chosen = choose_device_batch(lo, rows, safety_margin, speed_cap)
    return SearchResult(device_batch_size=chosen, grad_accum=rows // chosen, max_found=lo, first_failure=hi,
                        stopped_by_speed=speed_cap is not None, trials=[asdict(t) for t in trials],
                        seconds=time.perf_counter() - t_start)


def _search_on_model(model, optimizers_factory, step_fn, seq_len: int, rows: int, device: torch.device,
                     compile: bool, safety_margin: float, stop_gain: float | None, timed_steps: int) -> SearchResult:
    was_training = model.training
    model.train()
    snapshot = _snapshot(model)
    try:
        def trial_fn(bs):
            return run_trial(model, optimizers_factory, step_fn, bs, seq_len, device, snapshot,
                             compile=compile, timed_steps=(timed_steps if stop_gain is not None else 0))
        return search_device_batch_size(trial_fn, rows, safety_margin, stop_gain)
    finally:
        _restore(model, snapshot)
        model.train(was_training)


# -----------------------------------------------------------------------------
# A real memory budget on CPU: the search runs in a spawned child under RLIMIT_AS

def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmSize not found in /proc/self/status")


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
    import subprocess
    import tempfile
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
        code = ("import sys; from nanochat.auto_batch_size import _budget_child_main; "
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


def _budget_search_job(model, optimizers_factory, step_fn, seq_len, rows, compile, safety_margin, stop_gain,
                       timed_steps):
    if compile:
        # Inductor's worker pool would fork helpers under the same address-space limit; compile in-process.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    return _search_on_model(model, optimizers_factory, step_fn, seq_len, rows, torch.device("cpu"),
                            compile, safety_margin, stop_gain, timed_steps)


def default_cpu_budget_gb() -> float:
    """Half of the host's total memory: on CPU an unbounded search would end in the kernel's OOM
    killer rather than an exception, so the CPU probe always runs under some budget. Total, not
    available, memory: the budget is part of the cache key, and it must not drift from one job to
    the next (the probe stage fills the cache that the training stages read)."""
    return device_total_memory(torch.device("cpu")) / 1024 ** 3 / 2


# -----------------------------------------------------------------------------
# Cache: one JSON file per sha256 key in a shared folder

def default_cache_dir(base_dir: str | os.PathLike | None = None) -> Path:
    return Path(base_dir or get_base_dir()) / "batch_size_cache"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def _describe_model(model) -> dict:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        desc = {"config": config.to_dict()}
    else:
        desc = {"shapes": [list(p.shape) for p in model.parameters()]}
    desc["class"] = type(getattr(model, "_orig_mod", model)).__qualname__
    desc["param_dtype"] = str(next(model.parameters()).dtype)
    return desc


def _describe_callable(fn) -> str:
    if fn is None:
        return "default"
    if hasattr(fn, "__dataclass_fields__"):
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def read_cache(cache_dir, key: str, rows: int | None = None) -> dict | None:
    """The entry for key, or None when missing. A corrupt or inconsistent entry is ignored with a
    warning (the caller probes again and overwrites it)."""
    path = cache_path(cache_dir, key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"batch size cache {path}: unreadable ({e}); probing again")
        return None
    try:
        entry = json.loads(text)
        bs, accum = entry["device_batch_size"], entry["grad_accum"]
        if not (isinstance(bs, int) and isinstance(accum, int) and bs >= 1 and accum >= 1):
            raise ValueError("device_batch_size/grad_accum must be positive integers")
        if entry.get("key") != key:
            raise ValueError("key does not match the file name")
        if rows is not None and bs * accum != rows:
            raise ValueError(f"device_batch_size x grad_accum = {bs * accum}, expected {rows}")
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"batch size cache {path}: corrupt entry ignored ({e}); probing again")
        return None
    return entry


def write_cache(cache_dir, key: str, entry: dict, lock_timeout_s: float = 60.0) -> Path:
    """Atomic write under a file lock. When an entry exists, the smaller device batch wins (a
    run-time fallback on one job must not be undone by another job's older probe)."""
    path = cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = dict(entry, key=key)
    try:
        with file_lock(str(path) + ".lock", timeout=lock_timeout_s):
            old = read_cache(cache_dir, key) if path.exists() else None
            if old is not None and entry.get("source") == "fallback" and old["device_batch_size"] < entry["device_batch_size"]:
                return path
            atomic_write_json(path, entry)
    except Timeout:
        warnings.warn(f"batch size cache {path}: lock busy for {lock_timeout_s} s; not cached")
    return path


# -----------------------------------------------------------------------------
# The entry points

def resolve_device_batch_size(model, optimizers_factory, seq_len: int, total_batch_size: int, world_size: int = 1,
                              device: torch.device | str | None = None, step_fn=None, *,
                              compile: bool = False, safety_margin: float = DEFAULT_SAFETY_MARGIN,
                              stop_gain: float | None = DEFAULT_STOP_GAIN, timed_steps: int = 2,
                              memory_budget_gb: float | None = None, use_cache: bool = True,
                              refresh_cache: bool = False, cache_dir: str | os.PathLike | None = None,
                              base_dir: str | os.PathLike | None = None, vocab_size: int | None = None,
                              autocast_dtype: str | None = "auto", cache_extra: dict | None = None,
                              budget_child_threads: int = 0):
    """Decide the device batch size for training `model` at `seq_len` with `total_batch_size` tokens
    per optimizer step over `world_size` ranks. Returns (device_batch_size, grad_accum, source, info):
    source is "cache" or "probe"; info holds max_found, trials, seconds, cache_key, cache_dir, ...
    device_batch_size * seq_len * world_size * grad_accum == total_batch_size always holds.
    Under torch.distributed every rank must call it; all ranks return the same numbers."""
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = rows_per_rank(total_batch_size, seq_len, world_size)
    compile = bool(compile) or hasattr(model, "_orig_mod")  # an already compiled model trains compiled
    if autocast_dtype == "auto":
        autocast_dtype = "bfloat16" if device.type == "cuda" else None
    if step_fn is None:
        vocab = vocab_size or model.config.vocab_size
        step_fn = TrainStep(seq_len=seq_len, vocab_size=vocab, world_size=world_size, autocast_dtype=autocast_dtype)
    # CPU: None = half the total memory, 0 = no budget (trials run in this process; only safe
    # when something else bounds the sizes, e.g. a step_fn that fails above a size).
    if device.type == "cpu" and memory_budget_gb is None:
        memory_budget_gb = round(default_cpu_budget_gb(), 1)
    if device.type != "cpu" or not memory_budget_gb:
        memory_budget_gb = None  # on a GPU the device's own memory is the budget

    parts = {
        "step_version": STEP_VERSION,
        "model": _describe_model(model),
        "seq_len": seq_len,
        "rows_per_rank": rows,
        "multi_rank": world_size > 1,   # the gradient all-reduce buffer exists only then
        "autocast": autocast_dtype,
        "compile": bool(compile),
        "optimizers": _describe_callable(optimizers_factory),
        "step": _describe_callable(step_fn),
        "device": device_name(device),
        "device_memory": device_total_memory(device),
        "torch": torch.__version__,
        "memory_budget_gb": memory_budget_gb,
        "safety_margin": safety_margin,
        "stop_gain": stop_gain,
        **(cache_extra or {}),
    }
    key = cache_key(parts)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(base_dir)
    info = {"cache_key": key, "cache_dir": str(cache_dir), "rows_per_rank": rows, "memory_budget_gb": memory_budget_gb}
    is_rank0 = not _dist_active() or dist.get_rank() == 0

    # Rank 0 reads the cache and tells the others, so a write racing with the reads cannot split them.
    entry = read_cache(cache_dir, key, rows) if (use_cache and not refresh_cache and is_rank0) else None
    hit = _broadcast_ints([entry["device_batch_size"], entry.get("max_found", 0)] if entry else [0, 0], device)
    if hit[0] > 0:
        bs = hit[0]
        info.update(max_found=hit[1], trials=(entry or {}).get("trials", []), seconds=time.perf_counter() - t0)
        return bs, rows // bs, "cache", info

    if memory_budget_gb is not None and device.type == "cpu":
        # The search runs in a child under the budget; with several ranks, rank 0 searches and broadcasts.
        result, failure = None, None
        if is_rank0:
            job_model = copy.deepcopy(getattr(model, "_orig_mod", model)).cpu()
            try:
                result = run_under_memory_budget(
                    _budget_search_job, (job_model, optimizers_factory, step_fn, seq_len, rows, compile,
                                         safety_margin, stop_gain, timed_steps), memory_budget_gb,
                    threads=budget_child_threads)
            except Exception as e:  # noqa: BLE001 - the other ranks must hear of it before it is raised
                failure = e
            del job_model
        got = _broadcast_ints([result.device_batch_size, result.max_found] if result else [0, 0], device)
        if failure is not None:
            raise failure
        if got[0] < 1:
            raise RuntimeError("rank 0's memory-budget probe failed (see its log)")
        if result is None:
            result = SearchResult(device_batch_size=got[0], grad_accum=rows // got[0], max_found=got[1],
                                  first_failure=None, stopped_by_speed=False)
    else:
        result = _search_on_model(model, optimizers_factory, step_fn, seq_len, rows, device, compile,
                                  safety_margin, stop_gain, timed_steps)

    info.update(max_found=result.max_found, first_failure=result.first_failure,
                stopped_by_speed=result.stopped_by_speed, trials=result.trials,
                seconds=time.perf_counter() - t0)
    if use_cache and is_rank0:
        write_cache(cache_dir, key, {
            "device_batch_size": result.device_batch_size, "grad_accum": result.grad_accum,
            "max_found": result.max_found, "first_failure": result.first_failure,
            "stopped_by_speed": result.stopped_by_speed, "trials": result.trials, "source": "probe",
            "parts": parts, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })
    return result.device_batch_size, result.grad_accum, "probe", info


def _broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's values on every rank (identity without torch.distributed)."""
    if not _dist_active():
        return [int(v) for v in values]
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=comm_device)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def fallback_after_oom(device_batch_size: int, grad_accum: int, cache_key: str | None = None,
                       cache_dir: str | os.PathLike | None = None, device: torch.device | None = None) -> tuple[int, int]:
    """A real training step ran out of memory: returns (new_bs, new_accum) with the device batch
    halved (the largest divisor of the rows per rank at most half) and accumulation raised so
    new_bs * new_accum == device_batch_size * grad_accum. Frees cached memory and records the new
    size in the cache entry (if cache_key and cache_dir are given) so later runs start from it.
    The caller zeroes its gradients and redoes the same optimizer step. Raises MemoryError at 1."""
    rows = device_batch_size * grad_accum
    new_bs = largest_divisor_at_most(rows, device_batch_size // 2)
    if new_bs < 1:
        raise MemoryError("out of memory at device batch size 1: nothing smaller to fall back to")
    new_accum = rows // new_bs
    free_memory(device)
    print0(f"auto batch size: out of memory at device batch {device_batch_size}; "
           f"continuing at {new_bs} x {new_accum} accumulation steps (same total batch)")
    if cache_key and cache_dir and (not _dist_active() or dist.get_rank() == 0):
        old = read_cache(cache_dir, cache_key) or {}
        history = list(old.get("fallbacks", [])) + [{"from": device_batch_size, "to": new_bs,
                                                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
        write_cache(cache_dir, cache_key, dict(old, device_batch_size=new_bs, grad_accum=new_accum,
                                               source="fallback", fallbacks=history))
    return new_bs, new_accum


def find_optimal_device_batch_size(model, max_seq_len: int, total_batch_size: int, ddp_world_size: int = 1,
                                   data_sample_fn=None, safety_margin: float = 0.85, device=None,
                                   override: int | None = None, enable_cache: bool = True, **opts) -> int:
    """The earlier fork's call. Its safety_margin is the fraction of the maximum kept (0.85); the
    answer now also divides the total batch exactly. Optimizers are nanochat's (build_optimizers)."""
    if override:
        return int(override)
    from nanochat.optim import build_optimizers
    keep = safety_margin
    margin = 1.0 - keep if keep > 0.5 else keep  # accept either convention: 0.85 kept, or 0.15 margin
    step_fn = DataSampleStep(data_sample_fn, max_seq_len) if data_sample_fn is not None else None
    bs, _accum, _source, _info = resolve_device_batch_size(
        model, build_optimizers, max_seq_len, total_batch_size, ddp_world_size, device, step_fn,
        safety_margin=margin, use_cache=enable_cache, **opts)
    return bs


# -----------------------------------------------------------------------------
# The probe stage recipe

@dataclass
class ProbeConfig:
    base_dir: str = ""
    out_dir: str = ""
    init_from: str = ""                 # a checkpoint folder: probe that model instead of a fresh one
    device_type: str = ""
    depth: int = 4
    seq_len: int = 512
    vocab_size: int = 4096
    total_batch_size: int = 0           # tokens per optimizer step; 0 = seq_len * world_size * 64
    world_size: int = 1                 # ranks the training will use (the probe itself runs on one)
    compile: bool = False
    memory_budget_gb: float = 0.0       # CPU only; 0 = half the total memory
    safety_margin: float = DEFAULT_SAFETY_MARGIN
    stop_gain: float = DEFAULT_STOP_GAIN  # < 0 disables the throughput stop
    use_cache: bool = True
    refresh_cache: bool = False
    cache_dir: str = ""


def validate_probe_config(cfg: ProbeConfig) -> None:
    for name in ("depth", "seq_len", "vocab_size", "world_size"):
        if int(getattr(cfg, name)) < 1:
            raise ConfigError(f"probe.{name}: must be a positive integer, got {getattr(cfg, name)!r}")
    if not 0.0 <= cfg.safety_margin < 1.0:
        raise ConfigError(f"probe.safety_margin: must be in [0, 1), got {cfg.safety_margin}")
    if cfg.memory_budget_gb < 0:
        raise ConfigError(f"probe.memory_budget_gb: must be >= 0, got {cfg.memory_budget_gb}")
    if cfg.device_type not in ("", "cpu", "cuda", "mps"):
        raise ConfigError(f"probe.device_type: unknown device {cfg.device_type!r}")


def run(cfg: ProbeConfig, should_stop=None) -> dict:
    """Probe (or read from the cache) the device batch size for one model shape; returns a result row."""
    from nanochat.gpt import GPTConfig, build_model
    from nanochat.optim import build_optimizers
    validate_probe_config(cfg)
    t0 = time.perf_counter()
    device_type = cfg.device_type or autodetect_device_type()
    device = torch.device(device_type)
    if cfg.init_from:
        from nanochat.checkpoint import load_model  # the checkpoint module owns the folder format
        model, _tokenizer, _meta = load_model(cfg.init_from, device)
    else:
        gpt_config = GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.seq_len)
        model = build_model(gpt_config, device)  # random init: memory does not depend on the weights
    total = cfg.total_batch_size or cfg.seq_len * cfg.world_size * 64
    bs, accum, source, info = resolve_device_batch_size(
        model, build_optimizers, cfg.seq_len, total, cfg.world_size, device,
        compile=cfg.compile, safety_margin=cfg.safety_margin,
        stop_gain=(cfg.stop_gain if cfg.stop_gain >= 0 else None),
        memory_budget_gb=(cfg.memory_budget_gb or None), use_cache=cfg.use_cache, refresh_cache=cfg.refresh_cache,
        cache_dir=(cfg.cache_dir or None), base_dir=(cfg.base_dir or None))
    row = dict(
        kind="probe", state="COMPLETED", device_name=device_name(device), world_size=cfg.world_size,
        depth=model.config.n_layer, n_params=model.num_params(), seq_len=cfg.seq_len,
        device_batch_size=bs, batch_size_source=source, total_batch_size=total, grad_accum_steps=accum,
        compile=cfg.compile, peak_memory_bytes=peak_memory_bytes(device),
        wall_time_s=time.perf_counter() - t0,
        max_found=info.get("max_found"), first_failure=info.get("first_failure"),
        trials=info.get("trials", []), seconds=info.get("seconds"), cache_key=info["cache_key"],
        memory_budget_gb=info.get("memory_budget_gb"), stopped_by_speed=info.get("stopped_by_speed"),
    )
    if cfg.out_dir:
        atomic_write_json(Path(cfg.out_dir) / "probe.json", row)
    return row
