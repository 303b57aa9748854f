"""
Automatic device batch size: find the largest per-device batch that trains without running out
of memory with a safety margin of the device's memory left over, and keep the configured total batch
(tokens per optimizer step) exact by trying only device batches that divide it; gradient
accumulation makes up the rest.

How it searches:
- A trial is one real training step (the training's own forward/backward with full logits, backward,
  optimizer step with its state allocated) on the real model, at the stage's sequence length, autocast
  (bf16 on cuda) and compile setting. Weights are snapshotted to CPU before and restored after every
  trial, and the trial's optimizers are fresh ones from `optimizers_factory`, so the caller's model and
  optimizers end exactly as they were.
- The margin is applied to bytes: every trial runs with only (1 - safety_margin) of the device's memory
  available (CUDA: torch.cuda.set_per_process_memory_fraction, so the caching allocator's own
  out-of-memory error stops a trial that needs more, fragmentation and workspaces included; CPU: the
  budget child's address-space limit). The size kept is the largest divisor of the rows per rank
  R = total_batch / (seq_len * world_size) whose trial passes. Each trial records its measured peak.
- Only divisors of R are tried: growth (each next size the smallest divisor at least twice the last,
  up to R), then a binary search over the divisors between the last pass and the first failure.
- When the training compiles, the trials step the training's compiled module (resolve_device_batch_size's
  `compiled`), so the search measures the compiled step and its graphs serve the training that follows:
  with dynamo's default dynamic setting a graph for the first size and one with a symbolic batch size
  for every other, the training's size included. A training compiled with dynamic=False (SFT) searches
  eager and confirms the chosen size with one compiled step, again on the training's own module.
- The speed check (stop_gain; eager training only): the baseline and the next smaller divisor are
  timed in interleaved rounds; the smaller is kept only when every round of it beats every round of
  the baseline by stop_gain, and never when one size's timings disagree by more than NOISE_LIMIT
  (a contended machine). The timings go into the cache entry; a size below the baseline expires.
- time_limit_s: no trial starts that would overrun it; the best size found so far is kept.
- With several ranks, every rank runs every trial and the verdicts are reduced (MIN on success,
  MAX on step time and peak) in one collective per trial that every rank reaches whatever its outcome,
  so a rank that runs out of memory cannot deadlock the others and all ranks agree.
- On CPU the search runs under a real memory budget in a spawned child process: after importing
  torch and warming up its thread pools, the child measures its address-space size (VmSize) and
  sets RLIMIT_AS to that baseline plus (1 - safety_margin) x the budget. The budget is therefore the
  address space the training step may add on top of the torch runtime (model, optimizer state,
  activations, logits); an allocation beyond it fails with the CPU allocator's real error. Address
  space bounds resident memory from above, so a size found this way also stays within it in RSS.

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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import Timeout

from nanochat.device import device_name, device_total_memory, peak_memory_bytes, reset_peak_memory
from nanochat.distributed import any_rank, collective_device, dist_active, print0
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, get_base_dir
from nanochat.locking import file_lock
from nanochat.optim import build_optimizers
from nanochat.training.geometry import divisors, is_positive_int, largest_divisor_at_most, rows_per_rank
from nanochat.training.routes import autocast_context, compile_model, resolve_compile, train_precision_route
# At import, not in TrainStep: the budget child imports this module before it sets its limit, and
# the training step's own imports (the data loader's pyarrow) map address space that is no trial's.
from nanochat.training.step import forward_backward

# Bump when the trial step changes in a way that changes its memory: old cache entries stop matching.
STEP_VERSION = 2   # 2: the margin on bytes, trials at divisors only, training's forward_backward
DEFAULT_SAFETY_MARGIN = 0.15
DEFAULT_STOP_GAIN = 0.05      # a smaller size must be this much faster, in every round, to be chosen
SPEED_ROUNDS = 3              # interleaved timing rounds per comparison
NOISE_LIMIT = 0.25            # one size's timings disagreeing by more than this: the machine is contended
SPEED_CHOICE_TTL_S = 7 * 24 * 3600   # a size chosen for speed (below the memory baseline) is re-measured after this

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
# The trial step

@dataclass
class TrainStep:
    """The default trial step: base/mid training's own micro-batch (training.step.forward_backward, the
    same call and autocast, so a compiled trial runs the graph training runs) and optimizer step, on
    random tokens (memory does not depend on the data). A dataclass, not a closure, so it can be
    pickled into the budget child."""
    seq_len: int
    vocab_size: int
    world_size: int = 1
    autocast_dtype: str | None = None  # "bfloat16" on cuda, None = no autocast

    def __call__(self, model, optimizers, batch_size: int) -> None:
        device = next(model.parameters()).device
        buckets = reserve_gradient_buckets(model) if self.world_size > 1 else None
        rows = torch.randint(0, self.vocab_size, (batch_size, self.seq_len + 1), device=device)
        mask = torch.ones_like(rows, dtype=torch.bool)
        precision = "bf16" if self.autocast_dtype == "bfloat16" else "fp32"
        loss = forward_backward(model, rows, mask, batch_size, device, autocast_context(precision, device))
        del loss, rows, mask
        gathered = reserve_muon_gather(optimizers) if self.world_size > 1 else None
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        del buckets, gathered


def reserve_gradient_buckets(model) -> torch.Tensor:
    """A multi-rank training run keeps its gradients in optim.GradientBuckets' flat buffers (each
    .grad a view into them: one gradient's worth of bytes), allocated once and held through every
    step, forward included. A multi-rank trial lays its gradients out the same way, without the
    collectives (a rank that fails mid-trial must not leave the others waiting in one; verdicts are
    reduced after the trial): backward accumulates into the views, so the trial holds what training
    holds, not a reserve beside freshly allocated gradients. Returns the buffer; the caller's
    zero_grad(set_to_none=True) and dropping it free both."""
    params = [p for p in model.parameters() if p.requires_grad]
    buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        p.grad = buffer[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return buffer


def reserve_muon_gather(optimizers) -> torch.Tensor | None:
    """Sharded Muon (optim.Muon.shard) holds every rank's all-gathered updates, one copy of the
    matrices, until it applies them: the trial's optimizer step holds as much (it runs unsharded)."""
    from nanochat.optim import Muon
    params = [p for opt in optimizers if isinstance(opt, Muon) for g in opt.param_groups for p in g["params"]]
    if not params:
        return None
    return torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)


@dataclass
class Trial:
    batch_size: int
    ok: bool
    seconds: float = 0.0           # time of the timed step(s) (max over ranks), 0 when not timed
    tokens_per_s: float | None = None
    error: str = ""
    compiled: bool = False         # ran the compiled step
    phase: str = "memory"          # memory (the search) | compiled (confirmation) | timed (speed check)
    peak_memory_bytes: int | None = None   # measured over the trial (common.peak_memory_bytes; max over ranks)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reduce_trial(status: int, seconds: float, peak: int, device: torch.device) -> tuple[int, float, int]:
    """One collective per trial, reached by every rank whatever happened: status MAX (0 ok, 1 OOM,
    2 other error), step time MAX (the slowest rank sets the pace) and peak memory MAX."""
    if not dist_active():
        return status, seconds, peak
    comm_device = collective_device(device)
    t = torch.tensor([float(status), seconds, float(peak)], dtype=torch.float64, device=comm_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()), float(t[1].item()), int(t[2].item())


def _snapshot(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def _restore(model, snapshot: dict) -> None:
    for k, v in model.state_dict().items():
        v.copy_(snapshot[k])


def run_trial(model, optimizers_factory, step_fn, batch_size: int, seq_len: int, device: torch.device,
              snapshot: dict, trial_model=None, timed_steps: int = 0, clock=time.monotonic) -> Trial:
    """One trial at batch_size: fresh optimizers, one step (allocates optimizer state; compiles),
    then max(timed_steps, 1) steady-state steps (timed with clock() when timed_steps > 0), stepping `trial_model`
    (the compiled module when the training compiles; `model` itself by default). Frees everything and
    restores the weights whatever happens. Under torch.distributed every rank must call it with the
    same batch_size."""
    status, error, seconds, failure = 0, "", 0.0, None
    trial_model = model if trial_model is None else trial_model
    optimizers = None
    free_memory(device)
    reset_peak_memory(device)
    try:
        optimizers = optimizers_factory(model)
        step_fn(trial_model, optimizers, batch_size)
        _synchronize(device)
        # The first step creates the optimizer state only after its backward; every later step holds
        # that state through forward and backward, so memory peaks there: at least one more step,
        # timed when asked for.
        t0 = clock()
        for _ in range(max(timed_steps, 1)):
            step_fn(trial_model, optimizers, batch_size)
        _synchronize(device)
        if timed_steps > 0:
            seconds = (clock() - t0) / timed_steps
    except Exception as e:  # noqa: BLE001 - an OOM is a verdict; anything else is re-raised below
        status = 1 if is_oom_error(e) else 2
        error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        if status == 2:
            failure = e
        else:
            e.__traceback__ = None  # the traceback pins the trial's tensors; drop it before freeing
    peak = peak_memory_bytes(device)
    optimizers = None
    model.zero_grad(set_to_none=True)
    _restore(model, snapshot)
    free_memory(device)
    # Every rank reaches this collective, whatever its own trial did.
    status, seconds, peak = _reduce_trial(status, seconds, peak, device)
    if status == 2:
        if failure is not None:
            raise failure
        raise RuntimeError(f"another rank failed its trial at device batch size {batch_size} (not out of memory)")
    ok = status == 0
    if not ok and not error:
        error = "out of memory on another rank"
    tps = (batch_size * seq_len / seconds) if (ok and seconds > 0) else None
    return Trial(batch_size=batch_size, ok=ok, seconds=seconds, tokens_per_s=tps, error=error,
                 compiled=trial_model is not model, peak_memory_bytes=peak)


# -----------------------------------------------------------------------------
# The search

@dataclass
class SearchResult:
    device_batch_size: int
    grad_accum: int
    max_found: int              # largest size that ran within the margin (0: none)
    first_failure: int | None   # smallest size that did not (None: none failed)
    stopped_by_speed: bool      # the speed check chose a size below the memory baseline
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    baseline: int = 0           # the size memory alone gives (after the compiled confirmation)
    stopped_by_deadline: bool = False
    compile_confirmed: bool | None = None   # None: compile off; False: no compiled confirmation ran in time
    speed: dict | None = None   # the interleaved timings behind the speed check (None: not run)
    memory_baseline: int = 0    # CPU budget child: its resident bytes before the model (trial peaks include them)


def _spread(rates: list[float]) -> float:
    return max(rates) / min(rates) - 1.0 if rates and min(rates) > 0 else math.inf


def speed_check(time_fn, rows: int, baseline: int, stop_gain: float, rounds: int = SPEED_ROUNDS,
                noise_limit: float = NOISE_LIMIT, out_of_time=lambda: False, log=print0) -> dict:
    """May a size below the memory baseline train faster? Compares the current size with the next
    smaller divisor (about half) in `rounds` interleaved rounds (A B, B A, ...: drift hits both).
    The smaller one is taken only when its slowest round beats the current size's fastest round by
    more than stop_gain (faster every time, beyond the spread of the timings); and when
    the timings of one size disagree among themselves by more than noise_limit, the machine was
    contended and no speed-based choice is made at all (the baseline stays). Returns a record with
    every timing; record["chosen"] is the size to use. time_fn(bs) -> Trial with seconds per step."""
    record = {"baseline": baseline, "stop_gain": stop_gain, "rounds": rounds, "noise_limit": noise_limit,
              "comparisons": [], "contended": False, "stopped_by_deadline": False, "chosen": baseline}
    current = baseline
    while current > 1:
        smaller = largest_divisor_at_most(rows, current // 2)
        if smaller < 1 or smaller == current:
            break
        rates: dict[int, list[float]] = {current: [], smaller: []}
        for r in range(rounds):
            if out_of_time():
                record["stopped_by_deadline"] = True
                break
            for size in ((current, smaller) if r % 2 == 0 else (smaller, current)):
                t = time_fn(size)
                # rows per second (seq_len is the same for both): a failed step counts as infinitely slow
                rates[size].append(size / t.seconds if (t.ok and t.seconds > 0) else 0.0)
        done = len(rates[smaller]) == rounds and len(rates[current]) == rounds
        noise = max(_spread(rates[current]), _spread(rates[smaller])) if done else None
        # significance: the smaller size's slowest round beats the current size's fastest by stop_gain
        faster_every_round = done and min(rates[smaller]) > max(rates[current]) * (1.0 + stop_gain)
        contended = done and noise > noise_limit
        record["comparisons"].append({"sizes": [current, smaller],
                                      "rows_per_s": {str(current): rates[current], str(smaller): rates[smaller]},
                                      "noise": noise, "faster_every_round": faster_every_round,
                                      "contended": contended})
        log(f"auto batch size: speed {current} vs {smaller}: "
            f"{'smaller faster in every round' if faster_every_round else 'keep'}"
            f"{' (contended: timings disagree by %.0f%%; no speed-based choice)' % (100 * noise) if contended else ''}")
        if contended:
            record["contended"] = True
            current = baseline   # a choice measured under contention is noise: memory decides
            break
        if not faster_every_round:
            break
        current = smaller
    record["chosen"] = current
    return record


def search_device_batch_size(trial_fn, rows: int, stop_gain: float | None = DEFAULT_STOP_GAIN, log=print0, *,
                             time_fn=None, confirm_fn=None, deadline: float | None = None,
                             speed_rounds: int = SPEED_ROUNDS, noise_limit: float = NOISE_LIMIT,
                             agree=lambda flag: flag, clock=time.monotonic) -> SearchResult:
    """The largest divisor of `rows` whose trial passes, on any `trial_fn(batch_size) -> Trial` (its
    memory verdict: the trial ran within the margin's share of the device, see _search_on_model).
    Only divisors are tried: growth (each next size the smallest divisor at least twice the last, up to
    rows itself), then a binary search over the divisors between the last pass and the first failure.
    Then, when given:
    - confirm_fn(bs) -> Trial: the compiled step at the chosen size, backing off to the next smaller
      divisor until one passes (when the search itself ran eager);
    - time_fn(bs) -> Trial with seconds, and stop_gain: the speed check (speed_check above);
    - deadline (a clock() reading): no trial starts when the last one's duration would overrun it;
      the search keeps the best size found so far and says so (stopped_by_deadline). agree(flag)
      makes the ranks of a distributed probe take that decision together (any rank out of time).
    clock() -> seconds times the trials against the deadline (tests drive it: no verdict on the machine's load).
    Kept apart from torch so the exact sequence of trials is easy to reason about and test."""
    t_start = clock()
    sizes = divisors(rows)
    trials: list[Trial] = []
    last = [0.0]  # duration of the latest trial: the estimate for the next one

    def out_of_time() -> bool:
        return deadline is not None and agree(clock() + last[0] > deadline)

    def attempt(bs: int, fn=trial_fn, label: str = "trial") -> Trial:
        t0 = clock()
        t = fn(bs)
        last[0] = clock() - t0
        t.phase = "memory" if label == "trial" else label
        trials.append(t)
        peak = f" peak {t.peak_memory_bytes / 2**20:,.0f} MiB" if t.ok and t.peak_memory_bytes else ""
        log(f"auto batch size: {label} {bs:5d} {'ok ' if t.ok else 'OOM'}{peak} {t.error if not t.ok else ''}".rstrip())
        return t

    lo, hi = -1, None          # indices into sizes: largest pass, smallest failure
    stopped_by_deadline = False
    i = 0
    while True:
        if lo >= 0 and out_of_time():
            stopped_by_deadline = True
            break
        if not attempt(sizes[i]).ok:
            hi = i
            break
        lo = i
        if i == len(sizes) - 1:
            break
        i = next(k for k in range(i + 1, len(sizes)) if sizes[k] >= 2 * sizes[i] or k == len(sizes) - 1)

    if lo < 0:
        raise ConfigError(f"device_batch_size: even 1 row of {rows} per rank does not fit in memory "
                          f"({trials[0].error}); use a smaller model, seq_len or a larger memory budget")
    while hi is not None and hi - lo > 1 and not stopped_by_deadline:
        if out_of_time():
            stopped_by_deadline = True
            break
        mid = (lo + hi) // 2
        if attempt(sizes[mid]).ok:
            lo = mid
        else:
            hi = mid
    max_found, first_failure = sizes[lo], (sizes[hi] if hi is not None else None)

    chosen, compile_confirmed = max_found, None
    if confirm_fn is not None:
        compile_confirmed = False
        while True:
            if out_of_time() and chosen != max_found:
                stopped_by_deadline = True   # at least the first confirmation always runs
                break
            if attempt(chosen, confirm_fn, "compiled").ok:
                compile_confirmed = True
                break
            smaller = largest_divisor_at_most(rows, chosen - 1)
            if smaller < 1:
                raise ConfigError(f"device_batch_size: the compiled step does not fit even 1 row of {rows} "
                                  f"per rank ({trials[-1].error}); set compile off or use a smaller model")
            chosen = smaller
    baseline = chosen

    speed = None
    if stop_gain is not None and time_fn is not None and baseline > 1 and not stopped_by_deadline:
        speed = speed_check(lambda b: attempt(b, time_fn, "timed"), rows, baseline, stop_gain, speed_rounds,
                            noise_limit, out_of_time, log)
        chosen = speed["chosen"]
    return SearchResult(device_batch_size=chosen, grad_accum=rows // chosen, max_found=max_found,
                        first_failure=first_failure, stopped_by_speed=chosen < baseline,
                        trials=[asdict(t) for t in trials], seconds=clock() - t_start, baseline=baseline,
                        stopped_by_deadline=stopped_by_deadline or bool(speed and speed["stopped_by_deadline"]),
                        compile_confirmed=compile_confirmed, speed=speed)


@contextmanager
def memory_share(device: torch.device, fraction: float):
    """On CUDA, the caching allocator may take only `fraction` of the device's memory while inside (its
    own out-of-memory error beyond that): a trial that passes ran within that share, fragmentation and
    workspaces included. Elsewhere nothing (the CPU budget child sets its own limit)."""
    if device.type != "cuda" or fraction >= 1.0:
        yield
        return
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    before = get(device) if get is not None else 1.0
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(before, device)


def _search_on_model(model, optimizers_factory, step_fn, seq_len: int, rows: int, device: torch.device,
                     compile: bool, safety_margin: float, stop_gain: float | None, timed_steps: int,
                     deadline: float | None = None, compile_backend="inductor", compiled=None,
                     compiled_search: bool = True, clock=time.monotonic) -> SearchResult:
    """The search on the real model, every trial within (1 - safety_margin) of the device's memory
    (memory_share on CUDA; on a CPU the budget child's limit is already that share). When the training
    compiles, the trials step `compiled` (the training's own compiled module, so its graphs serve
    training too: one compile for both; without one, a module compiled here as training compiles):
    - compiled_search True (dynamo's default dynamic): every trial compiled, the memory of the step
      training runs; a graph for the first size, one with a symbolic batch size for all the others;
    - False (a training compiled with dynamic=False: a compile per size, and FlexAttention's block mask
      wants fixed shapes): the search runs eager and the compiled step confirms the chosen size."""
    was_training = model.training
    model.train()
    snapshot = _snapshot(model)
    if compile and compiled is None:   # no module from the caller (a probe stage, the budget child): build one as training does
        compiled = compile_model(model, compile_backend, None if compiled_search else False)
    searched = compiled if (compile and compiled_search) else None
    try:
        def trial_fn(bs):
            return run_trial(model, optimizers_factory, step_fn, bs, seq_len, device, snapshot, searched)

        def confirm_fn(bs):
            return run_trial(model, optimizers_factory, step_fn, bs, seq_len, device, snapshot, compiled)

        def time_fn(bs):
            return run_trial(model, optimizers_factory, step_fn, bs, seq_len, device, snapshot,
                             timed_steps=max(1, timed_steps), clock=clock)
        # Timing compiled steps would cost a compile per size with dynamic=False, and eager timings are
        # not the compiled step's: with compile on there is no speed check (memory decides).
        with memory_share(device, 1.0 - safety_margin):
            return search_device_batch_size(trial_fn, rows, None if compile else stop_gain,
                                            time_fn=None if compile else time_fn,
                                            confirm_fn=confirm_fn if (compile and not compiled_search) else None,
                                            deadline=deadline, agree=lambda flag: any_rank(flag, device),
                                            clock=clock)
    finally:
        _restore(model, snapshot)
        model.train(was_training)


# -----------------------------------------------------------------------------
# A real memory budget on CPU: the search runs in a spawned child under RLIMIT_AS

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
                       timed_steps, deadline=None, compile_backend="inductor", compiled_search=True,
                       clock=time.monotonic):
    if compile:
        # Inductor's worker pool would fork helpers under the same address-space limit; compile in-process.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1
    result = _search_on_model(model, optimizers_factory, step_fn, seq_len, rows, torch.device("cpu"),
                              compile, safety_margin, stop_gain, timed_steps, deadline, compile_backend,
                              compiled_search=compiled_search, clock=clock)
    result.memory_baseline = _CHILD_RSS_BASELINE
    return result


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


MAX_ENTRY_BYTES = 4 << 20


def _check_entry(entry, key: str, rows: int | None) -> None:
    """Raise ValueError unless entry is a well-formed cache entry for key (every field a reader uses)."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    bs, accum = entry.get("device_batch_size"), entry.get("grad_accum")
    if not (is_positive_int(bs) and is_positive_int(accum)):
        raise ValueError("device_batch_size/grad_accum must be positive integers")
    if entry.get("key") != key:
        raise ValueError("key does not match the file name")
    if rows is not None and bs * accum != rows:
        raise ValueError(f"device_batch_size x grad_accum = {bs * accum}, expected {rows}")
    if entry.get("max_found") is not None and not (isinstance(entry["max_found"], int) and not isinstance(entry["max_found"], bool)):
        raise ValueError("max_found must be an integer")
    trials = entry.get("trials", [])
    if not (isinstance(trials, list) and all(isinstance(t, dict) and isinstance(t.get("batch_size"), int)
                                             and isinstance(t.get("ok", True), bool) for t in trials)):
        raise ValueError("trials must be a list of {batch_size, ok, ...}")
    fallbacks = entry.get("fallbacks", [])
    if not (isinstance(fallbacks, list) and all(isinstance(f, dict) for f in fallbacks)):
        raise ValueError("fallbacks must be a list of objects")
    expires = entry.get("expires_at")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))):
        raise ValueError("expires_at must be a number (unix time)")


def read_cache(cache_dir, key: str, rows: int | None = None) -> dict | None:
    """The entry for key, or None when missing or expired. Whatever is wrong with the file (unreadable,
    not UTF-8, not JSON, nested too deep, wrong types, inconsistent numbers) it is ignored with a
    warning naming it: the caller probes again and overwrites it. Never raises for the file's content."""
    path = cache_path(cache_dir, key)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)   # an entry is a few kB; a device or huge file is not one
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"batch size cache {path}: unreadable ({e}); probing again")
        return None
    try:
        if len(data) > MAX_ENTRY_BYTES:
            raise ValueError(f"larger than {MAX_ENTRY_BYTES} bytes")
        entry = json.loads(data.decode("utf-8"))
        _check_entry(entry, key, rows)
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        warnings.warn(f"batch size cache {path}: corrupt entry ignored ({type(e).__name__}: {str(e)[:200]}); probing again")
        return None
    if entry.get("expires_at") is not None and entry["expires_at"] < time.time():
        print0(f"auto batch size: cache entry {path} (a speed-based choice) has expired; probing again")
        return None
    return entry


def update_cache(cache_dir, key: str, update, lock_timeout_s: float = 60.0) -> Path:
    """Read-modify-write of one entry under its file lock: update(the current entry or None) returns the
    entry to write, or None to leave the file as it is. Reading under the lock is what keeps two writers
    (a probe and a run-time fallback, two ranks' fallbacks) from each writing over what the other read."""
    path = cache_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(str(path) + ".lock", timeout=lock_timeout_s):
            old = read_cache(cache_dir, key) if path.exists() else None
            new = update(old)
            if new is not None:
                atomic_write_json(path, dict(new, key=key))
    except Timeout:
        warnings.warn(f"batch size cache {path}: lock busy for {lock_timeout_s} s; not cached")
    except OSError as e:   # e.g. a directory squatting on the entry's name: the answer still holds, uncached
        warnings.warn(f"batch size cache {path}: cannot write ({type(e).__name__}: {e}); not cached")
    return path


def _last_fallback_at(entry: dict) -> float | None:
    times = [f.get("at_unix") for f in entry.get("fallbacks", [])]
    times = [t for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)]
    return max(times) if times else (0.0 if entry.get("fallbacks") else None)


def kept_entry(old: dict | None, new: dict) -> dict | None:
    """Which entry a write leaves (None: the old one stays). A run-time fallback on one job must not be
    undone by another job's older probe: an entry with fallbacks keeps its smaller device batch against
    a probe that started before its last fallback (probe_started_at; a probe without one counts as
    older). A fallback does not raise a size another writer has already lowered further. A probe
    started after the fallback (a --refresh) replaces it: that is a new measurement."""
    if old is None:
        return new
    smaller = old["device_batch_size"] < new["device_batch_size"]
    if new.get("source") == "fallback" and smaller:
        return None
    last_fallback = _last_fallback_at(old)
    if new.get("source") == "probe" and smaller and last_fallback is not None:
        started = new.get("probe_started_at")
        if not isinstance(started, (int, float)) or started < last_fallback:
            print0(f"auto batch size: keeping the cached run-time fallback (device batch {old['device_batch_size']}) "
                   f"against a probe that started before it ({new['device_batch_size']})")
            return None
    return new


def write_cache(cache_dir, key: str, entry: dict, lock_timeout_s: float = 60.0) -> Path:
    """Atomic write under a file lock, as kept_entry decides against the entry already there."""
    with warnings.catch_warnings():   # a probe's reader already warned about a corrupt entry
        warnings.filterwarnings("ignore", message="batch size cache .*: corrupt entry ignored")
        return update_cache(cache_dir, key, lambda old: kept_entry(old, entry), lock_timeout_s)


# -----------------------------------------------------------------------------
# The entry points

def auto_batch_options(model, seq_len: int, total_batch_size: int, world_size: int, device: torch.device,
                       compile_setting, precision: str = "auto") -> dict:
    """The arguments (and so the cache key) of the automatic device batch size for a base or mid
    training run: THE one place they are derived. The training loop and the probe stage that serves
    it both call this, so the entry a probe writes is the entry training reads. build_optimizers
    itself: optimizer memory does not depend on the learning rates; the trial steps run under the
    training's own autocast (bf16 activations take half the memory of fp32 ones). The step count is not
    known here, so on a CPU compile auto and precision fast are keyed as the eager fp32 step (the search
    runs eager there anyway; a compiled or bf16 step usually takes less memory)."""
    autocast = "bfloat16" if train_precision_route(precision, device) == "bf16" else None
    return dict(model=model, optimizers_factory=build_optimizers, seq_len=seq_len, total_batch_size=total_batch_size,
                world_size=world_size, device=device, compile=resolve_compile(compile_setting, device),
                vocab_size=model.config.vocab_size, autocast_dtype=autocast)


@dataclass
class KeyInputs:
    """What the cache key is made of, and the settings derived on the way (the probe runs with them)."""
    key: str
    parts: dict
    rows: int
    device: torch.device
    compile: bool
    step_fn: object
    memory_budget_gb: float | None


def key_inputs(model, optimizers_factory, seq_len: int, total_batch_size: int, world_size: int = 1,
               device: torch.device | str | None = None, step_fn=None, *, compile: bool = False,
               safety_margin: float = DEFAULT_SAFETY_MARGIN, stop_gain: float | None = DEFAULT_STOP_GAIN,
               memory_budget_gb: float | None = None, vocab_size: int | None = None,
               autocast_dtype: str | None = "auto", cache_extra: dict | None = None, **_run_options) -> KeyInputs:
    """THE derivation of the batch-size cache key (and of the probe's settings) from what a training
    run is: its model, optimizers, step, seq_len, total batch, world size, device, compile, autocast
    (and on CPU the memory budget). safety_margin and stop_gain are accepted for symmetry and unused.
    resolve_device_batch_size calls it, and so do the probe stage and the tests that check that the
    key a probe writes is the key its training stage reads. Needs no memory: `model` may live on the
    meta device (only its config, class and parameter dtype are read) when `device` is given."""
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
        # not the margin nor the speed-check settings: they are the probe's policy, not what training
        # is; a probe with its own margin must still fill the entry training reads (they are in the entry)
        **(cache_extra or {}),
    }
    return KeyInputs(key=cache_key(parts), parts=parts, rows=rows, device=device, compile=bool(compile),
                     step_fn=step_fn, memory_budget_gb=memory_budget_gb)


def resolve_device_batch_size(model, optimizers_factory, seq_len: int, total_batch_size: int, world_size: int = 1,
                              device: torch.device | str | None = None, step_fn=None, *,
                              compile: bool = False, safety_margin: float = DEFAULT_SAFETY_MARGIN,
                              stop_gain: float | None = DEFAULT_STOP_GAIN, timed_steps: int = 1,
                              memory_budget_gb: float | None = None, use_cache: bool = True,
                              refresh_cache: bool = False, cache_dir: str | os.PathLike | None = None,
                              base_dir: str | os.PathLike | None = None, vocab_size: int | None = None,
                              autocast_dtype: str | None = "auto", cache_extra: dict | None = None,
                              budget_child_threads: int = 0, time_limit_s: float | None = None,
                              compile_backend="inductor", compiled=None, compiled_search: bool = True,
                              clock=time.monotonic):
    """Decide the device batch size for training `model` at `seq_len` with `total_batch_size` tokens
    per optimizer step over `world_size` ranks. Returns (device_batch_size, grad_accum, source, info):
    source is "cache" or "probe"; info holds max_found, trials, seconds, cache_key, cache_dir, ...
    device_batch_size * seq_len * world_size * grad_accum == total_batch_size always holds.
    The size kept is the largest divisor of the rows per rank whose trial step runs within
    (1 - safety_margin) of the device's memory (on a CPU: of memory_budget_gb).
    compiled: the training's own compiled module (compile on): the compiled trials step it, so the
    graphs they build serve the training that follows (not in the CPU budget child: another process).
    compiled_search: see _search_on_model.
    time_limit_s: the search stops starting trials after this long and keeps the best size so far
    (info["stopped_by_deadline"]). clock() -> seconds times the trials and the time limit (default
    time.monotonic; tests pass a clock their step function advances). Under torch.distributed every
    rank must call it; all ranks return the same numbers."""
    if not 0.0 <= safety_margin < 1.0:
        raise ConfigError(f"safety_margin: {safety_margin} must be in [0, 1)")
    t0, started_at = time.perf_counter(), time.time()
    deadline = clock() + time_limit_s if time_limit_s else None
    ki = key_inputs(model, optimizers_factory, seq_len, total_batch_size, world_size, device, step_fn,
                    compile=compile, safety_margin=safety_margin, stop_gain=stop_gain,
                    memory_budget_gb=memory_budget_gb, vocab_size=vocab_size, autocast_dtype=autocast_dtype,
                    cache_extra=cache_extra)
    device, rows, compile, step_fn = ki.device, ki.rows, ki.compile, ki.step_fn
    memory_budget_gb, parts, key = ki.memory_budget_gb, ki.parts, ki.key
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(base_dir)
    info = {"cache_key": key, "cache_dir": str(cache_dir), "rows_per_rank": rows, "memory_budget_gb": memory_budget_gb}
    is_rank0 = not dist_active() or dist.get_rank() == 0

    # Rank 0 reads the cache and tells the others, so a write racing with the reads cannot split them.
    entry = read_cache(cache_dir, key, rows) if (use_cache and not refresh_cache and is_rank0) else None
    hit = _broadcast_ints([entry["device_batch_size"], entry.get("max_found") or 0] if entry else [0, 0], device)
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
                # the margin applied to bytes: the child's limit is (1 - margin) of the budget
                result = run_under_memory_budget(
                    _budget_search_job, (job_model, optimizers_factory, step_fn, seq_len, rows, compile,
                                         safety_margin, stop_gain, timed_steps, deadline, compile_backend,
                                         compiled_search, clock),
                    memory_budget_gb * (1.0 - safety_margin),
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
                                  safety_margin, stop_gain, timed_steps, deadline, compile_backend, compiled,
                                  compiled_search, clock)

    info.update(max_found=result.max_found, first_failure=result.first_failure,
                stopped_by_speed=result.stopped_by_speed, trials=result.trials,
                seconds=time.perf_counter() - t0, baseline=result.baseline,
                stopped_by_deadline=result.stopped_by_deadline, compile_confirmed=result.compile_confirmed,
                speed=result.speed, memory_baseline_bytes=result.memory_baseline or None)
    if result.stopped_by_deadline:
        print0(f"auto batch size: time limit ({time_limit_s:.0f} s) reached; keeping device batch "
               f"{result.device_batch_size}, the best found so far (a later --refresh can search further)")
    if use_cache and is_rank0:
        entry = {
            "device_batch_size": result.device_batch_size, "grad_accum": result.grad_accum,
            "max_found": result.max_found, "first_failure": result.first_failure, "baseline": result.baseline,
            "stopped_by_speed": result.stopped_by_speed, "stopped_by_deadline": result.stopped_by_deadline,
            "compile_confirmed": result.compile_confirmed, "speed": result.speed,
            "trials": result.trials, "source": "probe", "safety_margin": safety_margin, "stop_gain": stop_gain,
            "parts": parts, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "probe_started_at": started_at,   # against a run-time fallback recorded meanwhile (kept_entry)
        }
        if result.stopped_by_speed:
            # below the memory baseline on timings alone: measure again after a while rather than forever
            entry["expires_at"] = time.time() + SPEED_CHOICE_TTL_S
        write_cache(cache_dir, key, entry)
    return result.device_batch_size, result.grad_accum, "probe", info


def _broadcast_ints(values: list[int], device: torch.device) -> list[int]:
    """Rank 0's values on every rank (identity without torch.distributed)."""
    if not dist_active():
        return [int(v) for v in values]
    comm_device = collective_device(device)
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
    if cache_key and cache_dir and (not dist_active() or dist.get_rank() == 0):
        def record(old: dict | None) -> dict | None:   # runs under the entry's lock, on what is there now
            old = old or {}
            history = list(old.get("fallbacks", [])) + [{"from": device_batch_size, "to": new_bs, "at_unix": time.time(),
                                                         "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
            return kept_entry(old or None, dict(old, device_batch_size=new_bs, grad_accum=new_accum,
                                                source="fallback", fallbacks=history))
        update_cache(cache_dir, cache_key, record)
    return new_bs, new_accum
