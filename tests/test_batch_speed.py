"""
The speed check must not let noise decide the cached batch size: the default probe records its
timings, timings that wander as on a contended machine never take the size below the memory
baseline (nor get cached as a speed choice), and a real speed advantage is recorded with its timings
and expires. Real model, real steps; each step's duration is told to a StepClock the probe reads,
so what the probe sees is exactly the test's timings, whatever the machine's load.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest
import torch

from helpers import StepClock
from nanochat.training.batch_size.cache import cache_path, read_cache, write_cache
from nanochat.training.batch_size.options import SearchOptions
from nanochat.training.batch_size.resolve import resolve as resolve_batch_size
from nanochat.training.batch_size.trial import TrainStep
from nanochat.recipes.probe import ProbeConfig, run as run_probe
from nanochat.gpt import GPTConfig, build_model
from nanochat.optim import build_optimizers

SEQ, VOCAB = 32, 256


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model():
    torch.manual_seed(0)
    return build_model(GPTConfig.from_depth(1, VOCAB, SEQ))


@dataclass
class JitterStep:
    """The real step, taking (on the probe's clock) a base time plus a wait drawn from a seeded
    generator: every size's timings wander by up to `max_wait` per step, as on a machine that other
    jobs keep busy. Size 2 is also made to look 2x faster per row on average, to tempt a speed-based
    choice."""
    clock: StepClock
    max_wait: float = 0.12
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    def __call__(self, model, optimizers, batch_size):
        TrainStep(SEQ, VOCAB)(model, optimizers, batch_size)
        base = 0.02 * batch_size if batch_size > 2 else 0.005 * batch_size
        self.clock.advance(base + self.rng.uniform(0.0, self.max_wait))


@dataclass
class SlowLargeStep:
    """The real step, taking (on the probe's clock) a fixed time per row that is 4x longer above 2
    rows: sizes 1-2 really train more rows per second than 4, by far more than any margin."""
    clock: StepClock

    def __call__(self, model, optimizers, batch_size):
        TrainStep(SEQ, VOCAB)(model, optimizers, batch_size)
        self.clock.advance((0.15 if batch_size > 2 else 0.0375) * batch_size)


def resolve(step, tmp_path, **kw):
    return resolve_batch_size(SearchOptions(tiny_model(), build_optimizers, SEQ, 4 * SEQ, 1, "cpu", step,
                                            memory_budget_gb=0, cache_dir=tmp_path, clock=step.clock, **kw))


@pytest.mark.slow
def test_default_probe_records_its_timings_in_the_cache_entry(tmp_path):
    cfg = ProbeConfig(depth=1, seq_len=SEQ, vocab_size=VOCAB, total_batch_size=8 * SEQ, cache_dir=str(tmp_path),
                      refresh_cache=True, device_type="cpu")   # every other key: the default
    row = run_probe(cfg)
    assert row["batch_size_source"] == "probe" and row["device_batch_size"] * row["grad_accum_steps"] == 8
    entry = read_cache(tmp_path, row["cache_key"], 8)
    assert entry["speed"]["rounds"] == 3 and entry["speed"]["comparisons"]   # the timings are in the entry


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1234, 1, 2])
def test_contended_timings_never_go_below_the_baseline_nor_get_cached_as_speed(tmp_path, seed):
    # the same answer whatever the draw: noise alone never moves the cached size
    step = JitterStep(StepClock(), rng=random.Random(seed))
    bs, accum, source, info = resolve(step, tmp_path)   # the default stop_gain, rounds and noise limit
    assert source == "probe" and bs == info["baseline"] == 4 and not info["stopped_by_speed"]
    first = info["speed"]["comparisons"][0]
    assert len(first["rows_per_s"]["4"]) == len(first["rows_per_s"]["2"]) == 3
    entry = read_cache(tmp_path, info["cache_key"], 4)
    assert entry["device_batch_size"] == 4 and "expires_at" not in entry and entry["speed"] == info["speed"]


@pytest.mark.slow
def test_a_real_speed_advantage_is_taken_recorded_and_expires(tmp_path):
    bs, accum, source, info = resolve(SlowLargeStep(StepClock()), tmp_path, stop_gain=0.05)
    assert info["baseline"] == 4 and (bs, accum) == (2, 2) and info["stopped_by_speed"]
    # the timings the probe recorded are the step's own: 4 rows at 0.15 s, 2 rows at 0.0375 s each
    first = info["speed"]["comparisons"][0]
    assert first["rows_per_s"] == {"4": [pytest.approx(4 / 0.6)] * 3, "2": [pytest.approx(2 / 0.075)] * 3}
    entry = read_cache(tmp_path, info["cache_key"], 4)
    assert entry["device_batch_size"] == 2 and entry["baseline"] == 4
    assert time.time() < entry["expires_at"] <= time.time() + 8 * 24 * 3600
    # once expired, the entry is measured again rather than trusted
    write_cache(tmp_path, info["cache_key"], dict(entry, expires_at=time.time() - 1))
    assert read_cache(tmp_path, info["cache_key"], 4) is None
    assert cache_path(tmp_path, info["cache_key"]).exists()
