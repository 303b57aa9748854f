"""
The geometry of one optimizer step, decided and checked in one place for base/mid training, SFT and the
automatic batch size:
    total_batch_size (tokens per step, all ranks) == device_batch_size x seq_len x world_size x grad_accum
The total is kept exact: the device batch sizes a run may take are the divisors of the rows one rank
processes per step (rows_per_rank = total / (seq_len x world_size)), and gradient accumulation makes up
the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from nanochat.errors import ConfigError


def is_positive_int(value) -> bool:
    """An int >= 1 (not a bool): what a device batch size or accumulation count read from a file must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_total(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> None:
    """THE check of a step's geometry, with its one message."""
    per_micro = device_batch_size * seq_len * world_size
    if min(total_batch_size, device_batch_size, seq_len, world_size) <= 0 or total_batch_size % per_micro:
        raise ConfigError(f"total_batch_size={total_batch_size}: must be a positive multiple of device_batch_size x "
                          f"seq_len x world_size = {device_batch_size} x {seq_len} x {world_size} = {per_micro} "
                          f"(tokens per optimizer step, kept exact by gradient accumulation)")


def rows_per_rank(total_batch_size: int, seq_len: int, world_size: int) -> int:
    """Rows one rank processes per optimizer step (device_batch_size x grad_accum), before the device
    batch is known: the total must be a multiple of seq_len x world_size (a device batch of 1)."""
    _check_total(total_batch_size, 1, seq_len, world_size)
    return total_batch_size // (seq_len * world_size)


def known_total(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Tokens per optimizer step as far as the config tells before the device batch is resolved: the
    configured total, else one micro-batch per rank of a fixed device batch, else 0 (automatic, unknown)."""
    if total_batch_size:
        return total_batch_size
    return device_batch_size * seq_len * world_size if device_batch_size > 0 else 0


def divisors(n: int) -> list[int]:
    """The device batch sizes that keep the total batch exact: every d with d | n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_divisor_at_most(n: int, limit: int) -> int:
    """Largest d with d | n and d <= limit (0 when limit < 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 0


@dataclass(frozen=True)
class StepGeometry:
    """One optimizer step: grad_accum micro-batches of device_batch_size rows of seq_len tokens on each
    of world_size ranks."""
    device_batch_size: int
    grad_accum: int
    seq_len: int
    world_size: int

    @classmethod
    def from_total(cls, total_batch_size: int, device_batch_size: int, seq_len: int,
                   world_size: int) -> StepGeometry:
        """The step of a configured total (0: one micro-batch per rank) at a device batch size."""
        total = known_total(total_batch_size, device_batch_size, seq_len, world_size)
        _check_total(total, device_batch_size, seq_len, world_size)
        return cls(device_batch_size, total // (device_batch_size * seq_len * world_size), seq_len, world_size)

    @property
    def rows_per_rank(self) -> int:
        return self.device_batch_size * self.grad_accum

    @property
    def total_batch_size(self) -> int:
        return self.device_batch_size * self.seq_len * self.world_size * self.grad_accum

    def with_device_batch(self, device_batch_size: int) -> StepGeometry:
        """The same rows per rank (so the same total) in micro-batches of device_batch_size rows."""
        if not is_positive_int(device_batch_size) or self.rows_per_rank % device_batch_size:
            raise ValueError(f"device_batch_size {device_batch_size} does not divide "
                             f"{self.rows_per_rank} rows per rank")
        return replace(self, device_batch_size=device_batch_size, grad_accum=self.rows_per_rank // device_batch_size)
