"""
Automatic device batch size: the search (exact trial sequences with an injected failure threshold),
the margin and divisibility rules, the real CPU memory budget, the cache (concurrent writers,
corrupt entries), rank agreement over gloo, and the run-time OOM fallback.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import socket
from dataclasses import dataclass

import pytest
import torch

from helpers import StepClock
from nanochat.training.batch_size.budget import run_under_memory_budget
from nanochat.training.batch_size.cache import cache_path, read_cache, write_cache
from nanochat.training.batch_size.oom import is_oom_error
from nanochat.training.batch_size.options import SearchOptions
from nanochat.training.batch_size.resolve import fallback_after_oom, resolve as resolve_batch_size
from nanochat.training.batch_size.search import search_device_batch_size
from nanochat.training.batch_size.trial import Trial, TrainStep
from nanochat.recipes.probe import ProbeConfig, run as run_probe
from nanochat.training.geometry import divisors
from nanochat.errors import ConfigError
from nanochat.gpt import CompiledGPT, GPTConfig, build_model
from nanochat.optim import build_optimizers

SEQ = 64
VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(GPTConfig.from_depth(2, VOCAB, SEQ))


def fake_oom(batch_size: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch_size * 0.25:.2f} GiB. "
                                  "GPU 0 has a total capacity of 79.15 GiB of which 20.00 MiB is free.")


@dataclass
class ThresholdStep:
    """The real training step up to `limit` rows; above it, the error a GPU raises when it is full.
    Counts the sizes it was asked for."""
    limit: int
    seq_len: int = SEQ
    vocab_size: int = VOCAB

    def __post_init__(self):
        self.calls: list[int] = []

    def __call__(self, model, optimizers, batch_size):
        self.calls.append(batch_size)
        if batch_size > self.limit:
            raise fake_oom(batch_size)
        TrainStep(self.seq_len, self.vocab_size)(model, optimizers, batch_size)


def resolve(model, step, rows, tmp_path=None, world_size=1, **kw):
    kw.setdefault("stop_gain", None)
    kw.setdefault("use_cache", tmp_path is not None)
    return resolve_batch_size(SearchOptions(model, build_optimizers, SEQ, rows * SEQ * world_size, world_size, "cpu",
                                            step, cache_dir=tmp_path, memory_budget_gb=0, **kw))


def tried(info) -> list[int]:
    return [t["batch_size"] for t in info["trials"]]


# -----------------------------------------------------------------------------
# OOM recognition

def test_is_oom_error_recognises_allocation_failures_only():
    assert is_oom_error(fake_oom(8))
    assert is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert is_oom_error(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ALLOCATED"))
    assert is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert is_oom_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] err == 0. DefaultCPUAllocator: "
                                     "can't allocate memory: you tried to allocate 4294967296 bytes."))
    assert is_oom_error(MemoryError())
    assert not is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"))
    assert not is_oom_error(ValueError("out of memory"))  # only runtime errors carry allocator messages
    assert not is_oom_error(KeyError("x"))


# -----------------------------------------------------------------------------
# The search on the real model with an injected failure threshold

@pytest.mark.slow
def test_exact_trial_sequence_margin_and_divisibility():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 24 rows per rank (divisors 1 2 3 4 6 8 12 24), fits up to 11: grow 1, 2, 4, 8, 24 (fail), then the
    # one divisor between 8 and 24, 12 (fail): 8 is the largest divisor that fits.
    step = ThresholdStep(limit=11)
    bs, accum, source, info = resolve(model, step, rows=24)
    assert tried(info) == [1, 2, 4, 8, 24, 12]
    assert [t["ok"] for t in info["trials"]] == [True, True, True, True, False, False]
    assert (bs, accum, source) == (8, 3, "probe")
    assert info["max_found"] == 8 and info["first_failure"] == 12
    assert bs * SEQ * 1 * accum == 24 * SEQ
    # trials never change the caller's weights and leave no gradients behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_only_divisors_are_tried_and_never_more_than_the_rows():
    # 20 rows (divisors 1 2 4 5 10 20), fits up to 11: 1, 2, 4, 10 (the smallest divisor >= 8), 20 (fail)
    step = ThresholdStep(limit=11)
    bs, accum, _, info = resolve(tiny_model(), step, rows=20)
    assert tried(info) == [1, 2, 4, 10, 20]
    assert (bs, accum) == (10, 2)
    # everything fits: no trial above the 8 rows per rank (the rows margin tried ceil(8 / 0.85) = 10)
    bs, accum, _, info = resolve(tiny_model(), ThresholdStep(limit=1000), rows=8)
    assert tried(info) == [1, 2, 4, 8]
    assert (bs, accum) == (8, 1)
    assert divisors(24) == [1, 2, 3, 4, 6, 8, 12, 24] and divisors(7) == [1, 7]


def quiet(*_):
    pass


def table_timer(seconds: dict[int, list[float]]):
    """time_fn from a table of step times per size, one per call (the rounds), recording the calls."""
    calls: list[int] = []

    def time_fn(bs):
        calls.append(bs)
        return Trial(bs, True, seconds=seconds[bs][sum(1 for c in calls if c == bs) - 1])
    return time_fn, calls


def test_memory_search_never_stops_for_speed():
    # the old speed-aware stop ended growth at 8 here (370/360 tok/s); memory now decides the trials
    result = search_device_batch_size(lambda bs: Trial(bs, True), rows=16, stop_gain=0.05, log=quiet)
    assert [t["batch_size"] for t in result.trials] == [1, 2, 4, 8, 16]
    assert result.device_batch_size == result.baseline == 16 and not result.stopped_by_speed


def test_speed_check_needs_the_smaller_size_faster_every_time():
    # 8 rows in 1.0 s vs 16 rows in 2.4 s: 8 is 20% faster in every interleaved round -> chosen
    time_fn, calls = table_timer({16: [2.4] * 3, 8: [1.0] * 6, 4: [0.6] * 3})
    result = search_device_batch_size(lambda bs: Trial(bs, True), rows=16, stop_gain=0.05, log=quiet, time_fn=time_fn)
    assert calls == [16, 8, 8, 16, 16, 8, 8, 4, 4, 8, 8, 4]          # interleaved A B, B A, A B
    assert result.baseline == 16 and result.device_batch_size == 8 and result.stopped_by_speed
    first = result.speed["comparisons"][0]
    assert first["rows_per_s"] == {"16": [16 / 2.4] * 3, "8": [8.0] * 3}   # the timings are recorded
    # faster in two rounds of three, or by less than the margin: the baseline stays
    for eight in ([1.0, 1.0, 1.3], [1.16, 1.16, 1.16]):
        time_fn, _ = table_timer({16: [2.4, 2.4, 2.4], 8: eight})
        result = search_device_batch_size(lambda bs: Trial(bs, True), rows=16, stop_gain=0.05, log=quiet, time_fn=time_fn)
        assert result.device_batch_size == 16 and not result.stopped_by_speed


def test_contended_timings_make_no_speed_choice():
    # 8 is faster every round, but 16's own timings disagree by 50%: contention; memory decides
    time_fn, _ = table_timer({16: [2.4, 3.6, 2.4], 8: [0.5, 0.5, 0.5]})
    result = search_device_batch_size(lambda bs: Trial(bs, True), rows=16, stop_gain=0.05, log=quiet, time_fn=time_fn)
    assert result.device_batch_size == 16 and result.speed["contended"] and not result.stopped_by_speed
    # contention found one level down also takes back the level above: no speed-based choice at all
    time_fn, _ = table_timer({16: [2.4] * 3, 8: [1.0] * 6, 4: [0.1, 0.4, 0.1]})
    result = search_device_batch_size(lambda bs: Trial(bs, True), rows=16, stop_gain=0.05, log=quiet, time_fn=time_fn)
    assert result.device_batch_size == 16 and result.speed["contended"]


def test_deadline_keeps_the_best_size_found():
    clock = StepClock()

    def slow_trial(bs):
        clock.advance(0.05)
        return Trial(bs, True)
    result = search_device_batch_size(slow_trial, rows=64, stop_gain=None, log=quiet,
                                      deadline=clock() + 0.12, clock=clock)
    # 1 ends at 0.05 s, 2 at 0.10 s; 4 would end at 0.15 s, past the deadline: it does not start
    assert result.stopped_by_deadline and [t["batch_size"] for t in result.trials] == [1, 2]
    assert result.device_batch_size == result.max_found == 2


@dataclass
class CompiledLimitStep:
    """The real step; the compiled model runs out of memory above `compiled_limit` rows (a compiled
    step may allocate differently from the eager one)."""
    compiled_limit: int
    seq_len: int = SEQ
    vocab_size: int = VOCAB

    def __call__(self, model, optimizers, batch_size):
        if isinstance(model, CompiledGPT) and batch_size > self.compiled_limit:
            raise fake_oom(batch_size)
        TrainStep(self.seq_len, self.vocab_size)(model, optimizers, batch_size)


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo hands it and runs them as they are."""
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.slow
def test_compiled_search_steps_the_trainings_module_and_its_graphs_serve_training(tmp_path):
    from nanochat.training.routes import compile_model
    model = tiny_model()
    counter = CountingBackend()
    module = compile_model(model, backend=counter)          # what base training compiles and steps
    bs, accum, _, info = resolve(model, CompiledLimitStep(compiled_limit=64), rows=8, compile=True,
                                 compiled=module, tmp_path=tmp_path)
    assert [(t["batch_size"], t["compiled"]) for t in info["trials"]] == [(1, True), (2, True), (4, True), (8, True)]
    assert (bs, accum) == (8, 1) and info["compile_confirmed"] is None     # the search itself was compiled
    searched = counter.graphs
    assert searched > 0
    TrainStep(SEQ, VOCAB)(module, build_optimizers(model), bs)           # the training's step at the size found
    TrainStep(SEQ, VOCAB)(module, build_optimizers(model), 4)            # and after an OOM fallback's halving
    assert counter.graphs == searched                                   # nothing compiled again
    # a compiled step that fits less than the eager one: the compiled search sees it
    bs, accum, _, info = resolve(tiny_model(), CompiledLimitStep(compiled_limit=3), rows=8, compile=True,
                                 compile_backend=CountingBackend())
    assert tried(info) == [1, 2, 4] and (bs, accum) == (2, 4)


def test_eager_search_confirmed_by_the_trainings_fixed_shape_module(tmp_path):
    # SFT compiles with dynamic=False (a compile per size): the search runs eager, its own module
    # confirms the size, backing off 8 -> 4 -> 2 where the compiled step fits less
    model = tiny_model()
    counter = CountingBackend()
    module = CompiledGPT(model, backend=counter)   # as training.routes.compile_sft builds it
    bs, accum, _, info = resolve(model, CompiledLimitStep(compiled_limit=3), rows=8, compile=True, compiled=module,
                                 compiled_search=False, tmp_path=tmp_path)
    assert [t["batch_size"] for t in info["trials"] if not t["compiled"]] == [1, 2, 4, 8]
    assert [t["batch_size"] for t in info["trials"] if t["compiled"]] == [8, 4, 2]
    assert (bs, accum) == (2, 4) and info["compile_confirmed"] and info["baseline"] == 2
    assert read_cache(tmp_path, info["cache_key"], 8)["compile_confirmed"] is True
    graphs = counter.graphs
    TrainStep(SEQ, VOCAB)(module, build_optimizers(model), bs)
    assert counter.graphs == graphs                                     # the confirmation's graph serves training


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="total_batch_size"):
        resolve_batch_size(SearchOptions(tiny_model(), build_optimizers, SEQ, SEQ * 10 + 1, 1, "cpu",
                                         ThresholdStep(limit=4), use_cache=False, memory_budget_gb=0))
    with pytest.raises(ConfigError, match="device_batch_size"):
        resolve(tiny_model(), ThresholdStep(limit=0), rows=8)


def test_non_oom_error_in_a_trial_is_raised():
    def broken(model, optimizers, batch_size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        resolve(tiny_model(), broken, rows=8)


@pytest.mark.slow
def test_the_size_found_is_an_int_that_divides_the_rows(tmp_path):
    # what the earlier fork's find_optimal_device_batch_size shim was tested for, through the real entry:
    # 6 rows fit, 12 rows per rank, so 6 (a divisor of 12: the total stays exact), as a plain int
    bs, accum, source, _info = resolve(tiny_model(), ThresholdStep(limit=6), rows=12, tmp_path=tmp_path)
    assert type(bs) is int and type(accum) is int and (bs, accum, source) == (6, 2, "probe")


# -----------------------------------------------------------------------------
# Cache

@pytest.mark.slow
def test_cache_hit_refresh_and_corrupt_entry(tmp_path):
    model = tiny_model()
    step = ThresholdStep(limit=11)
    bs, accum, source, info = resolve(model, step, rows=24, tmp_path=tmp_path)
    assert source == "probe" and cache_path(tmp_path, info["cache_key"]).exists()
    n_calls = len(step.calls)
    bs2, accum2, source2, info2 = resolve(model, step, rows=24, tmp_path=tmp_path)
    assert (bs2, accum2, source2) == (bs, accum, "cache") and len(step.calls) == n_calls
    # a different total batch is a different key
    _, _, source3, info3 = resolve(model, step, rows=12, tmp_path=tmp_path)
    assert source3 == "probe" and info3["cache_key"] != info["cache_key"]
    # refresh probes again
    _, _, source4, _ = resolve(model, step, rows=24, tmp_path=tmp_path, refresh_cache=True)
    assert source4 == "probe"
    # a corrupt entry is ignored with a warning, probed again and replaced by a valid one
    path = cache_path(tmp_path, info["cache_key"])
    path.write_text('{"device_batch_size": 8, "grad_acc')
    with pytest.warns(UserWarning, match="corrupt"):
        bs5, accum5, source5, _ = resolve(model, step, rows=24, tmp_path=tmp_path)
    assert (bs5, accum5, source5) == (bs, accum, "probe")
    assert read_cache(tmp_path, info["cache_key"], 24)["device_batch_size"] == bs
    # an entry that breaks the total batch is also rejected
    entry = json.loads(path.read_text())
    path.write_text(json.dumps(dict(entry, device_batch_size=5)))
    with pytest.warns(UserWarning, match="corrupt"):
        assert read_cache(tmp_path, info["cache_key"], 24) is None
    # no cache at all
    calls = len(step.calls)
    _, _, source6, _ = resolve(model, step, rows=24, tmp_path=tmp_path, use_cache=False)
    assert source6 == "probe" and len(step.calls) > calls


def _cache_writer(cache_dir: str, worker: int) -> None:
    for i in range(20):
        key = f"{'k' * 63}{(worker + i) % 4}"
        bs = [1, 2, 4, 8][(worker * 7 + i) % 4]
        write_cache(cache_dir, key, {"device_batch_size": bs, "grad_accum": 8 // bs, "source": "probe",
                                     "worker": worker, "trials": [{"batch_size": b} for b in range(50)]})


def test_sixteen_concurrent_writers_leave_valid_entries(tmp_path):
    ctx = mp.get_context("fork")  # the writers only touch JSON and locks, never torch ops
    procs = [ctx.Process(target=_cache_writer, args=(str(tmp_path), w)) for w in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 4
    for path in entries:
        entry = read_cache(tmp_path, path.stem, rows=8)
        assert entry is not None and entry["device_batch_size"] * entry["grad_accum"] == 8
        assert len(entry["trials"]) == 50
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_a_fallback_entry_is_kept_against_a_probe_that_started_before_it(tmp_path):
    key = "e" * 64
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe", "probe_started_at": 100.0})
    assert fallback_after_oom(8, 1, key, tmp_path) == (4, 2)
    # a probe that was running when the fallback happened (started long before it) finishes and writes 8
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe", "probe_started_at": 200.0})
    entry = read_cache(tmp_path, key, rows=8)
    assert (entry["device_batch_size"], entry["source"]) == (4, "fallback")
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe"})   # no start time: older
    assert read_cache(tmp_path, key, rows=8)["device_batch_size"] == 4
    # a later fallback from a stale size does not raise what is cached
    assert fallback_after_oom(16, 1, key, tmp_path) == (8, 2)
    assert read_cache(tmp_path, key)["device_batch_size"] == 4
    # a probe started after the last fallback (a --refresh) is a new measurement: it replaces the entry
    last = max(f["at_unix"] for f in read_cache(tmp_path, key)["fallbacks"])
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe", "probe_started_at": last + 1})
    assert read_cache(tmp_path, key, rows=8)["source"] == "probe"


def _lock_is_free(lock_path: str, queue) -> None:
    from filelock import Timeout
    from nanochat.locking import file_lock
    try:
        with file_lock(lock_path, timeout=0):
            queue.put(True)
    except Timeout:
        queue.put(False)


def test_fallback_reads_the_entry_under_its_lock(tmp_path, monkeypatch):
    import nanochat.training.batch_size.cache as cache_module
    key = "d" * 64
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe"})
    seen = []
    real_read = cache_module.read_cache

    def read_and_look(cache_dir, k, rows=None):
        ctx = mp.get_context("fork")   # another process tries the entry's lock while the entry is read
        queue = ctx.Queue()
        p = ctx.Process(target=_lock_is_free, args=(str(cache_path(tmp_path, key)) + ".lock", queue))
        p.start()
        seen.append(queue.get(timeout=60))
        p.join(60)
        return real_read(cache_dir, k, rows)
    monkeypatch.setattr(cache_module, "read_cache", read_and_look)
    fallback_after_oom(8, 1, key, tmp_path)
    assert seen == [False]            # the lock was held while the entry it updates was read
    monkeypatch.setattr(cache_module, "read_cache", real_read)
    assert read_cache(tmp_path, key, rows=8)["device_batch_size"] == 4


# -----------------------------------------------------------------------------
# Run-time fallback: a real step runs out of memory, training goes on from the same step

def train_with_fallback(model, rows_per_step, bs, accum, steps, limit, cache_dir=None, key=None):
    """A minimal training loop as training/train_loop.py runs it: every optimizer step takes the same rows
    (seeded by the step), split into micro-batches of bs; an OOM redoes the step smaller."""
    optimizers = build_optimizers(model)
    done, history = [], []
    step = 0
    while step < steps:
        g = torch.Generator().manual_seed(1000 + step)
        rows = torch.randint(0, VOCAB, (rows_per_step, SEQ + 1), generator=g)
        try:
            for i in range(accum):
                micro = rows[i * bs:(i + 1) * bs]
                if micro.size(0) > limit:
                    raise fake_oom(micro.size(0))
                loss = model(micro[:, :-1], micro[:, 1:], loss_reduction="sum") / (rows_per_step * SEQ)
                loss.backward()
        except Exception as e:
            if not is_oom_error(e):
                raise
            model.zero_grad(set_to_none=True)
            bs, accum = fallback_after_oom(bs, accum, key, cache_dir)
            continue  # the same step again, smaller
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        done.append(step)
        history.append((bs, accum))
        step += 1
    return done, history


def test_fallback_continues_without_losing_steps(tmp_path, fp32_muon):
    key = "f" * 64
    write_cache(tmp_path, key, {"device_batch_size": 8, "grad_accum": 1, "source": "probe"})
    reference, failing = tiny_model(seed=3), tiny_model(seed=3)
    done_ref, hist_ref = train_with_fallback(reference, 8, 8, 1, steps=4, limit=100)
    done, hist = train_with_fallback(failing, 8, 8, 1, steps=4, limit=3, cache_dir=tmp_path, key=key)
    assert done == done_ref == [0, 1, 2, 3]                 # no step lost or repeated
    assert hist == [(2, 4)] * 4                             # 8 -> 4 -> 2, total unchanged
    assert all(b * a == 8 for b, a in hist)
    # The same training, re-split: only summation order differs. (AdamW's eps=1e-10 turns float
    # noise in near-zero embedding gradients into up to ~1e-4 of drift; one lost or repeated step
    # would move the weights by the learning rate, ~1e-2 and more.)
    for p_ref, p in zip(reference.parameters(), failing.parameters()):
        assert torch.allclose(p_ref, p, atol=1e-3, rtol=0)
    untouched = tiny_model(seed=3)
    assert not torch.allclose(untouched.lm_head.weight, failing.lm_head.weight, atol=1e-3, rtol=0)
    entry = read_cache(tmp_path, key, rows=8)
    assert (entry["device_batch_size"], entry["grad_accum"], entry["source"]) == (2, 4, "fallback")
    assert [(f["from"], f["to"]) for f in entry["fallbacks"]] == [(8, 4), (4, 2)]


def test_fallback_keeps_exact_total_for_odd_sizes():
    assert fallback_after_oom(3, 8) == (1, 24)      # half of 3 rounds down to 1
    assert fallback_after_oom(6, 4) == (3, 8)
    with pytest.raises(MemoryError):
        fallback_after_oom(1, 24)


# -----------------------------------------------------------------------------
# Ranks: two gloo processes agree even when only one fails a trial

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, limits: list[int], queue) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = tiny_model()
        step = ThresholdStep(limit=limits[rank])
        bs, accum, source, info = resolve_batch_size(SearchOptions(
            model, build_optimizers, SEQ, 24 * SEQ * 2, 2, "cpu", step, use_cache=False, stop_gain=None,
            memory_budget_gb=0))
        # a rank whose trial fails with something other than OOM: every rank raises, none hangs
        def broken_on_rank1(model, optimizers, batch_size):
            if rank == 1 and batch_size == 4:
                raise ValueError("a bug in the step")
            TrainStep(SEQ, VOCAB)(model, optimizers, batch_size)
        try:
            resolve_batch_size(SearchOptions(model, build_optimizers, SEQ, 24 * SEQ * 2, 2, "cpu", broken_on_rank1,
                                             use_cache=False, stop_gain=None, memory_budget_gb=0))
            raised = "nothing"
        except Exception as e:  # noqa: BLE001
            raised = f"{type(e).__name__}: {e}"
        # the time limit: rank 1 is slow (0.3 s a step on its clock), rank 0 alone would go on; they
        # stop together, same answer
        clock = StepClock()

        def slow_on_rank1(model, optimizers, batch_size):
            TrainStep(SEQ, VOCAB)(model, optimizers, batch_size)
            clock.advance(0.3 if rank == 1 else 0.0)
        bs3, accum3, _, info3 = resolve_batch_size(SearchOptions(
            model, build_optimizers, SEQ, 24 * SEQ * 2, 2, "cpu", slow_on_rank1, use_cache=False, stop_gain=0.05,
            memory_budget_gb=0, time_limit_s=1.5, clock=clock))
        limited = (bs3, accum3, info3["stopped_by_deadline"], [(t["batch_size"], t["phase"]) for t in info3["trials"]])
        queue.put((rank, bs, accum, source, tried(info), step.calls, raised, limited))
    except BaseException as e:  # noqa: BLE001
        queue.put((rank, "error", repr(e), None, None, None, None, None))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_agree_when_one_fails():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    # rank 0 fits 16 rows, rank 1 only 5: rank 1 alone fails at 8 and 6
    procs = [ctx.Process(target=_rank_worker, args=(r, port, [16, 5], queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2):
        r = queue.get(timeout=240)
        results[r[0]] = r
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs), results
    expected_trials = [1, 2, 4, 8, 6]  # 8 fails on rank 1; 6, the divisor of 24 between 4 and 8, too
    assert results[1][6] == "ValueError: a bug in the step"
    assert results[0][6].startswith("RuntimeError: another rank failed its trial at device batch size 4")
    # agreed under the time limit: rank 1's trials take 0.6 s (two steps), so 1 and 2 run and 4 would
    # overrun its 1.5 s; rank 0 stops with it, keeps 2 (the largest size that ran), and the speed check
    # does not start
    assert results[0][7] == results[1][7] == (2, 12, True, [(1, "memory"), (2, "memory")]), results
    for rank in (0, 1):
        _, bs, accum, source, trials, calls, _, _ = results[rank]
        assert (bs, accum, source) == (4, 6, "probe"), results[rank]
        assert trials == expected_trials
    # rank 0 ran every trial (it could fit 8 and 6 alone), each as two steps: the second holds the optimizer state
    assert results[0][5] == [b for b in expected_trials for _ in range(2)]


# -----------------------------------------------------------------------------
# A real memory budget on CPU

BUDGET_SEQ, BUDGET_VOCAB = 256, 4096


def _train_steps_job(model, bs: int, accum: int, steps: int) -> list[float]:
    """Runs inside the budget child: real training steps at (bs, accum)."""
    optimizers = build_optimizers(model)
    losses = []
    for _ in range(steps):
        for _ in range(accum):
            idx = torch.randint(0, BUDGET_VOCAB, (bs, BUDGET_SEQ + 1))
            loss = model(idx[:, :-1], idx[:, 1:]) / accum
            loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss) * accum)
    return losses


@pytest.mark.slow
def test_cpu_budget_is_real_grows_with_budget_and_training_fits(tmp_path):
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, BUDGET_VOCAB, BUDGET_SEQ))
    rows = 16
    found = {}
    for budget in (0.25, 0.5):
        bs, accum, source, info = resolve_batch_size(SearchOptions(
            model, build_optimizers, BUDGET_SEQ, rows * BUDGET_SEQ, 1, "cpu", memory_budget_gb=budget,
            stop_gain=None, cache_dir=tmp_path))
        assert source == "probe" and bs * accum == rows
        found[budget] = (bs, accum, info)
    small, large = found[0.25], found[0.5]
    assert small[2]["max_found"] < large[2]["max_found"]
    assert small[0] <= large[0]
    # the smaller budget's failures are the CPU allocator's own error, not a simulation
    failures = [t["error"] for t in small[2]["trials"] if not t["ok"]]
    assert failures and all("can't allocate memory" in e for e in failures)
    # training at the size found stays within the same budget
    losses = run_under_memory_budget(_train_steps_job, (model, small[0], small[1], 2), 0.25)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # and well past the first failure, training under the same budget fails with a real OOM
    with pytest.raises(MemoryError, match="allocate"):
        run_under_memory_budget(_train_steps_job, (model, 2 * small[2]["first_failure"], 1, 1), 0.25)
    # the budget is part of the cache key: each budget has its own entry
    assert small[2]["cache_key"] != large[2]["cache_key"]


@pytest.mark.slow
def test_the_margin_is_on_bytes_under_a_real_budget(tmp_path):
    """The size kept is the largest divisor whose step ran within (1 - margin) of the budget: its
    measured peak is inside that share, and halving the share keeps a smaller size."""
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_depth(2, BUDGET_VOCAB, BUDGET_SEQ))
    budget, found = 0.5, {}
    for margin in (0.0, 0.5):
        bs, accum, _, info = resolve_batch_size(SearchOptions(
            model, build_optimizers, BUDGET_SEQ, 32 * BUDGET_SEQ, 1, "cpu", memory_budget_gb=budget,
            safety_margin=margin, stop_gain=None, use_cache=False))
        kept = [t for t in info["trials"] if t["ok"] and t["batch_size"] == bs][-1]
        used = (kept["peak_memory_bytes"] - info["memory_baseline_bytes"]) / (budget * 2**30)
        assert 0 < used <= 1 - margin, (margin, used)
        assert all(32 % t["batch_size"] == 0 for t in info["trials"])
        found[margin] = bs
        failed = [t for t in info["trials"] if not t["ok"]]
        assert failed and all("can't allocate memory" in t["error"] for t in failed)   # the allocator's own error
    assert found[0.5] < found[0.0]


# -----------------------------------------------------------------------------
# The probe recipe and its command line

@pytest.mark.slow
def test_probe_command_json_and_cache(tmp_path, capsys):
    import argparse
    from jobs.commands import probe as probe_command
    parser = argparse.ArgumentParser()
    probe_command.add_arguments(parser)
    argv = ["--depth", "2", "--seq-len", "64", "--vocab-size", "512", "--total-batch-size", str(4 * 64),
            "--memory-budget-gb", "0.3", "--stop-gain", "-1", "--cache-dir", str(tmp_path), "--json"]
    assert probe_command.run(parser.parse_args(argv)) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["source"] == "probe" and first["batch_size"] * first["grad_accum"] == 4
    assert [t["batch_size"] for t in first["trials"]] == [1, 2, 4]      # never more than the 4 rows
    assert {"batch_size", "max_found", "trials", "seconds", "source", "grad_accum"} <= set(first)
    assert probe_command.run(parser.parse_args(argv)) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["source"] == "cache" and second["batch_size"] == first["batch_size"]
    assert probe_command.run(parser.parse_args(argv + ["--refresh"])) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["source"] == "probe"


def test_probe_config_validation():
    with pytest.raises(ConfigError, match="probe.depth"):
        run_probe(ProbeConfig(depth=0))
    with pytest.raises(ConfigError, match="probe.safety_margin"):
        run_probe(ProbeConfig(safety_margin=1.5))


@pytest.mark.slow
def test_bench_batch_reports_exact_size_and_cache_hit(capsys):
    import argparse
    from jobs.bench import batch as bench_batch
    parser = argparse.ArgumentParser()
    bench_batch.add_arguments(parser)
    args = parser.parse_args(["--depth", "2", "--seq-len", "64", "--vocab-size", "512", "--total-batch-size",
                              str(6 * 64), "--memory-budget-gb", "0.3", "--steps", "1", "--baseline-batch-size", "2",
                              "--json"])
    assert bench_batch.run(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["probe_source"], out["cache_source"]) == ("probe", "cache")
    assert out["trials"] == [1, 2, 6]             # the divisors of 6 rows, growing: all fit
    assert (out["device_batch_size"], out["grad_accum"]) == (6, 1)
    assert out["tokens_per_s_auto"] > 0 and out["tokens_per_s_baseline"] > 0


@dataclass
class SlowStep:
    """The real step, taking 0.1 s on the probe's clock: a model whose trials are long against the time limit."""
    clock: StepClock

    def __call__(self, model, optimizers, batch_size):
        TrainStep(SEQ, VOCAB)(model, optimizers, batch_size)
        self.clock.advance(0.1)


def test_time_limit_stops_the_search_keeps_the_best_size_and_says_so(tmp_path):
    step = SlowStep(StepClock())
    bs, accum, source, info = resolve(tiny_model(), step, rows=64, tmp_path=tmp_path, time_limit_s=0.9,
                                      clock=step.clock)
    # a trial is two steps (0.2 s): 1, 2, 4 and 8 end by 0.8 s; 16 would end at 1.0 s, past the limit
    assert info["stopped_by_deadline"] and tried(info) == [1, 2, 4, 8] and info["max_found"] == 8
    assert bs == info["max_found"] and bs * accum == 64
    entry = read_cache(tmp_path, info["cache_key"], 64)
    assert entry["stopped_by_deadline"] is True and entry["device_batch_size"] == bs


def test_probe_command_pipeline_flags_are_checked():
    import argparse
    from jobs.commands import probe as probe_command
    parser = argparse.ArgumentParser()
    probe_command.add_arguments(parser)
    with pytest.raises(ConfigError, match="--depth: not with --pipeline"):
        probe_command.config_from_args(parser.parse_args(["--pipeline", "smoke", "--depth", "4"]))
    with pytest.raises(ConfigError, match="--seq-len: required"):
        probe_command.config_from_args(parser.parse_args(["--depth", "4"]))
    with pytest.raises(ConfigError, match="--serves sft"):
        probe_command.config_from_args(parser.parse_args(["--pipeline", "smoke", "--serves", "sft"]))
    cfg = probe_command.config_from_args(parser.parse_args(["--pipeline", "artemis-a100", "--set", "defaults.depth=12"]))
    assert (cfg.serves, cfg.depth, cfg.world_size, cfg.vocab_size, cfg.seq_len, cfg.compile) == \
        ("base_train", 12, 2, 65536, 2048, "auto")
