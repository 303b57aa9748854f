"""
The forward/backward of one optimizer step of base and mid training: the step's rows sliced into
micro-batches, so on an out-of-memory error the same step can be rerun with a smaller device batch
and the same gradient. The batch-size trials step it too (batch_size.trial.TrainStep), so a trial
measures the memory of the step training runs.
"""
from __future__ import annotations

import torch

from nanochat.dataloader import rows_to_batch
from nanochat.optim import GradientBuckets


def forward_backward(model, rows: torch.Tensor, mask: torch.Tensor, B: int, device, autocast_ctx,
                     grad_buckets: GradientBuckets | None = None) -> torch.Tensor:
    """Accumulate gradients for this rank's rows of one optimizer step, in micro-batches of B rows.
    The loss is the sum over supervised targets divided by their count on this rank: the gradient
    is the same whatever B is, so the step can be re-split (OOM fallback) without changing it.
    grad_buckets is armed before the last micro-batch: only its backward launches communication."""
    n_valid = max(int(mask[:, 1:].sum()), 1)
    total = torch.zeros((), device=device)
    for i in range(0, rows.size(0), B):
        x, y = rows_to_batch(rows[i:i + B], mask[i:i + B], device)
        if grad_buckets is not None and i + B >= rows.size(0):
            grad_buckets.arm()
        with autocast_ctx():
            loss = model(x, y, loss_reduction="sum") / n_valid
        loss.backward()
        total += loss.detach()
    return total
