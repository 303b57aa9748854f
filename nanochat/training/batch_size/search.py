"""
The search for the largest device batch size whose trial runs within (1 - safety_margin) of the device's
memory: growth over the divisors of the rows per rank, then a binary search, then (when given) a
compiled confirmation and the speed check. search_device_batch_size is apart from torch, so the exact
sequence of trials is easy to reason about and test; search_on_model runs it on the real model.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from nanochat.distributed import any_rank, print0
from nanochat.errors import ConfigError
from nanochat.training.batch_size.options import DEFAULT_STOP_GAIN, SearchOptions
from nanochat.training.batch_size.trial import Trial, restore_weights, run_trial, snapshot_weights
from nanochat.training.geometry import divisors, largest_divisor_at_most
from nanochat.training.routes import compile_model

SPEED_ROUNDS = 3              # interleaved timing rounds per comparison
NOISE_LIMIT = 0.25            # one size's timings disagreeing by more than this: the machine is contended


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
    memory verdict: the trial ran within the margin's share of the device, see search_on_model).
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


def search_on_model(opts: SearchOptions, rows: int, deadline: float | None = None) -> SearchResult:
    """The search on the real model (opts as resolve.key_inputs completed them: a torch device, a step
    function, compile decided), every trial within (1 - safety_margin) of the device's memory
    (memory_share on CUDA; on a CPU the budget child's limit is already that share). When the training
    compiles, the trials step opts.compiled (the training's own compiled module, so its graphs serve
    training too: one compile for both; without one, a module compiled here as training compiles):
    - compiled_search True (dynamo's default dynamic): every trial compiled, the memory of the step
      training runs; a graph for the first size, one with a symbolic batch size for all the others;
    - False (a training compiled with dynamic=False: a compile per size, and FlexAttention's block mask
      wants fixed shapes): the search runs eager and the compiled step confirms the chosen size."""
    model, device, compile = opts.model, opts.device, opts.compile
    was_training = model.training
    model.train()
    weights = snapshot_weights(model)
    compiled = opts.compiled
    if compile and compiled is None:   # no module from the caller (a probe stage, the budget child): build one as training does
        compiled = compile_model(model, opts.compile_backend, None if opts.compiled_search else False)
    searched = compiled if (compile and opts.compiled_search) else None

    def trial(bs: int, trial_model=None, timed_steps: int = 0) -> Trial:
        return run_trial(model, opts.optimizers_factory, opts.step_fn, bs, opts.seq_len, device, weights, trial_model,
                         timed_steps=timed_steps, clock=opts.clock)

    # Timing compiled steps would cost a compile per size with dynamic=False, and eager timings are
    # not the compiled step's: with compile on there is no speed check (memory decides).
    speed_checked = not compile
    confirmed = compile and not opts.compiled_search
    try:
        with memory_share(device, 1.0 - opts.safety_margin):
            return search_device_batch_size(
                lambda bs: trial(bs, searched), rows, opts.stop_gain if speed_checked else None,
                time_fn=(lambda bs: trial(bs, None, max(1, opts.timed_steps))) if speed_checked else None,
                confirm_fn=(lambda bs: trial(bs, compiled)) if confirmed else None,
                deadline=deadline, agree=lambda flag: any_rank(flag, device), clock=opts.clock)
    finally:
        restore_weights(model, weights)
        model.train(was_training)
