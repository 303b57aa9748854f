"""
The device batch of a training run and the out-of-memory retry of one optimizer step, for base/mid
training and SFT alike. A step that runs out of memory on any rank is rerun with the same rows in
smaller micro-batches (batch_size.resolve.fallback_after_oom halves the device batch and keeps the
total exact), and every rank takes that decision together: the ranks agree on the out-of-memory
flag before anyone enters the gradient all-reduce, so one rank's OOM cannot leave the others
waiting there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from nanochat.device import reset_peak_memory
from nanochat.distributed import any_rank, print0
from nanochat.optim import zero_gradients
from nanochat.training.batch_size.oom import is_oom_error
from nanochat.training.batch_size.resolve import fallback_after_oom
from nanochat.training.geometry import StepGeometry, is_positive_int

# batch_size_source after a run-time out-of-memory fallback. A configured (fixed) batch stays the
# fixed side of the report's auto-vs-fixed comparison: it is marked, never counted as found.
OOM_FALLBACK_SOURCES = ("fallback", "config+oom_fallback")

T = TypeVar("T")


def source_after_oom(source: str) -> str:
    return "config+oom_fallback" if source in ("config", "config+oom_fallback") else "fallback"


@dataclass
class DeviceBatch:
    """What a training run steps with: the step geometry (a fallback makes the micro-batches smaller,
    never the step), where the device batch size came from (config, cache, probe, or one of
    OOM_FALLBACK_SOURCES) and the batch-size cache entry a fallback is recorded in (None: none)."""
    geometry: StepGeometry
    source: str
    cache_key: str | None = None
    cache_dir: str | None = None

    @property
    def size(self) -> int:
        return self.geometry.device_batch_size

    def fall_back(self, device) -> None:
        """Out of memory: the next smaller device batch, recorded in the cache entry (MemoryError at 1)."""
        smaller, _accum = fallback_after_oom(self.size, self.geometry.grad_accum, self.cache_key, self.cache_dir,
                                             device)
        self.geometry = self.geometry.with_device_batch(smaller)
        self.source = source_after_oom(self.source)

    def keep_fallback_of(self, meta: dict) -> bool:
        """On resume: an out-of-memory fallback of the interrupted attempt (its checkpoint's meta) is kept,
        its smaller device batch over the same rows per step, so the run does not run out of memory again."""
        kept, accum = meta.get("device_batch_size"), meta.get("grad_accum_steps")
        if (meta.get("batch_size_source") in OOM_FALLBACK_SOURCES and is_positive_int(kept) and kept < self.size
                and is_positive_int(accum) and kept * accum == self.geometry.rows_per_rank):
            self.geometry = self.geometry.with_device_batch(kept)
            self.source = source_after_oom(self.source)
            return True
        return False


def step_with_oom_retry(attempt: Callable[[int], T], batch: DeviceBatch, *, model, grad_buckets, device,
                        label: str, step: int) -> T:
    """attempt(device_batch_size) runs this rank's forward/backward of one optimizer step in micro-batches
    of that many rows and returns what the caller needs of it (the loss). When it runs out of memory on
    any rank, every rank drops the step's gradients, falls back to a smaller device batch and runs the
    same step again; any other error re-raises. With gradient buckets (overlap on several ranks) their
    collectives are completed on every rank either way, so they pair up. Returns the attempt's result."""
    while True:
        out_of_memory, result = False, None
        try:
            result = attempt(batch.size)
        except Exception as exc:  # only out-of-memory errors are handled; anything else re-raises
            if not is_oom_error(exc):
                raise
            out_of_memory = True
            exc.__traceback__ = None   # the traceback pins the failed attempt's tensors
            del exc
        if grad_buckets is not None:
            grad_buckets.launch_rest()  # every rank's bucket collectives pair up, even after an OOM
        out_of_memory = any_rank(out_of_memory, device)
        if grad_buckets is not None:
            grad_buckets.finish(apply=not out_of_memory)  # the averaged gradients, or dropped for the rerun
        if not out_of_memory:
            return result
        # Drop this step's partial gradients and rerun the same rows in smaller micro-batches
        # (at 1 row fall_back raises MemoryError, on every rank alike).
        zero_gradients(model, grad_buckets)
        batch.fall_back(device)
        reset_peak_memory(device)   # the failed attempt filled the device: not the peak of the size kept
        print0(f"{label} out of memory at step {step}: rerunning it with device_batch_size={batch.size}, "
               f"grad_accum={batch.geometry.grad_accum}")
