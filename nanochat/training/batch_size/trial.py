"""
One trial of the automatic batch size: a real training step at a batch size (fresh optimizers, their
state allocated), the weights snapshotted before and restored after, the peak memory measured, and
the verdict (ok, out of memory, or another error) agreed by every rank in one collective.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.device import peak_memory_bytes, reset_peak_memory, synchronize
from nanochat.distributed import collective_device, dist_active
from nanochat.errors import one_line
from nanochat.optim import Muon
from nanochat.training.batch_size.oom import free_memory, is_oom_error
from nanochat.training.routes import autocast_context
from nanochat.training.step import forward_backward


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
    peak_memory_bytes: int | None = None   # measured over the trial (device.peak_memory_bytes; max over ranks)


def _reduce_trial(status: int, seconds: float, peak: int, device: torch.device) -> tuple[int, float, int]:
    """One collective per trial, reached by every rank whatever happened: status MAX (0 ok, 1 OOM,
    2 other error), step time MAX (the slowest rank sets the pace) and peak memory MAX."""
    if not dist_active():
        return status, seconds, peak
    t = torch.tensor([float(status), seconds, float(peak)], dtype=torch.float64, device=collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0].item()), float(t[1].item()), int(t[2].item())


def snapshot_weights(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def restore_weights(model, snapshot: dict) -> None:
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
        synchronize(device)
        # The first step creates the optimizer state only after its backward; every later step holds
        # that state through forward and backward, so memory peaks there: at least one more step,
        # timed when asked for.
        t0 = clock() if timed_steps > 0 else 0.0
        for _ in range(max(timed_steps, 1)):
            step_fn(trial_model, optimizers, batch_size)
        synchronize(device)
        if timed_steps > 0:
            seconds = (clock() - t0) / timed_steps
    except Exception as e:  # noqa: BLE001 - an OOM is a verdict; anything else is re-raised below
        status = 1 if is_oom_error(e) else 2
        error = one_line(e)
        if status == 2:
            failure = e
        else:
            e.__traceback__ = None  # the traceback pins the trial's tensors; drop it before freeing
    peak = peak_memory_bytes(device)
    optimizers = None
    model.zero_grad(set_to_none=True)
    restore_weights(model, snapshot)
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

