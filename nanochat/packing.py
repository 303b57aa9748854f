"""
Batching tokenized conversations for SFT, three ways:

- pad-to-longest ("eager-dynamic"): B conversations per batch, padded to the longest one.
  Little padding, but the shape changes every step, so torch.compile would recompile each time.
- pad-to-max ("compile-pad"): B conversations per batch, every row padded to T = max_seq_len.
  One shape forever (compiles once), but with conversations of a few hundred tokens and T=2048
  most of the compute goes to padding.
- best-fit packing ("compile-pack"): several whole conversations per row of a fixed (B, T) batch,
  chosen by best-fit decreasing over a buffer of conversations. One shape and little padding.
  Each position carries a document id so attention can be kept inside its own conversation.
  "eager-pack" batches the same way without compiling, so packing's gain and compile's gain can be
  measured apart.

An example is a rendered conversation (ids, mask) from Tokenizer.render_conversation. A conversation
of L tokens gives L-1 positions: inputs ids[:-1], targets ids[1:], and a target is supervised
(not -1) where mask[1:] is 1. Conversations are truncated to T+1 tokens so they fit one row.

Planning (which conversations go in which row) is separate from building tensors, so an epoch can be
planned up front (ranks agree on the number of steps) without holding every batch in memory.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

MODES = ("eager-dynamic", "eager-pack", "compile-pad", "compile-pack")
PACKED_MODES = ("eager-pack", "compile-pack")  # best-fit packed rows with document ids

Example = tuple[list[int], list[int]]   # (ids, mask) of one conversation
Row = list[int]                         # indices of the examples placed in one row
BatchPlan = list[Row]                   # one micro-batch: B rows (some may be empty)

PAD_DOC_ID = -1  # doc id of padding positions: padding attends only to padding, so no mask row is empty


@dataclass
class Batch:
    inputs: torch.Tensor            # (B, T) token ids
    targets: torch.Tensor           # (B, T) next-token ids, -1 where no loss is taken
    doc_ids: torch.Tensor | None    # (B, T) conversation index within its row (packed rows only)
    num_positions: int              # B * T: what the hardware computes
    num_real: int                   # positions that belong to a conversation (not padding)
    num_supervised: int             # positions whose target carries loss (assistant tokens)
    num_conversations: int

    def pin_memory(self) -> "Batch":
        """The tensors in page-locked memory, so to(cuda) copies without blocking the host."""
        return Batch(self.inputs.pin_memory(), self.targets.pin_memory(),
                     None if self.doc_ids is None else self.doc_ids.pin_memory(),
                     self.num_positions, self.num_real, self.num_supervised, self.num_conversations)

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.inputs.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     None if self.doc_ids is None else self.doc_ids.to(device, non_blocking=nb),
                     self.num_positions, self.num_real, self.num_supervised, self.num_conversations)


def truncate(example: Example, max_seq_len: int) -> Example:
    """Keep at most max_seq_len + 1 tokens, i.e. at most max_seq_len positions."""
    ids, mask = example
    return ids[:max_seq_len + 1], mask[:max_seq_len + 1]


def num_positions(example: Example) -> int:
    return max(0, len(example[0]) - 1)


# -----------------------------------------------------------------------------
# Planning

def best_fit_decreasing(lengths: Sequence[int], capacity: int, num_bins: int,
                        candidates: Sequence[int] | None = None) -> tuple[list[Row], list[int]]:
    """Place items (by index) into at most num_bins bins of the given capacity, longest first, each
    into the open bin with the least room that still fits it (opening a new bin while fewer than
    num_bins are open). Returns (bins, indices that did not fit anywhere)."""
    order = sorted(candidates if candidates is not None else range(len(lengths)),
                   key=lambda i: (-lengths[i], i))
    bins: list[Row] = []
    # Open bins sorted by remaining room: (room, bin index). bisect finds the tightest fit in log time.
    rooms: list[tuple[int, int]] = []
    leftover: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has length {n} > capacity {capacity} (truncate first)")
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(i)
            bisect.insort(rooms, (room - n, b))
        elif len(bins) < num_bins:
            bins.append([i])
            bisect.insort(rooms, (capacity - n, len(bins) - 1))
        else:
            leftover.append(i)
    return bins, leftover


def plan_batches(lengths: Sequence[int], mode: str, batch_size: int, seq_len: int,
                 pack_buffer: int = 512) -> list[BatchPlan]:
    """Group examples (given by their number of positions, in stream order) into micro-batches.
    Padding modes take batch_size consecutive conversations per batch, one per row (the last batch
    of a compile mode is topped up with empty rows so its shape stays fixed). The packed modes keep a
    buffer of up to pack_buffer conversations, fills batch_size rows of seq_len by best-fit
    decreasing, and refills the buffer from the stream; leftovers wait for a later batch."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive (got {batch_size}, {seq_len})")
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} positions > seq_len {seq_len} (truncate first)")
    # Conversations with no position (a single token) carry nothing to learn from.
    stream = [i for i, n in enumerate(lengths) if n > 0]
    plans: list[BatchPlan] = []
    if mode not in PACKED_MODES:
        for s in range(0, len(stream), batch_size):
            rows = [[i] for i in stream[s:s + batch_size]]
            if mode == "compile-pad":
                rows += [[] for _ in range(batch_size - len(rows))]
            plans.append(rows)
        return plans
    buffer: list[int] = []
    next_item = 0
    while next_item < len(stream) or buffer:
        while len(buffer) < max(pack_buffer, batch_size) and next_item < len(stream):
            buffer.append(stream[next_item])
            next_item += 1
        rows, buffer = best_fit_decreasing(lengths, seq_len, batch_size, candidates=buffer)
        # Keep the rows in a stable order (bins were opened longest-first) and the buffer in stream order.
        buffer.sort()
        plans.append(rows + [[] for _ in range(batch_size - len(rows))])
    return plans


# -----------------------------------------------------------------------------
# Building tensors

def build_batch(examples: Sequence[Example], plan: BatchPlan, seq_len: int | None, pad_id: int,
                with_doc_ids: bool) -> Batch:
    """Tensors for one planned micro-batch. seq_len=None pads to the longest row (eager-dynamic)."""
    row_lengths = [sum(num_positions(examples[i]) for i in row) for row in plan]
    T = seq_len if seq_len is not None else max(1, max(row_lengths, default=1))
    B = len(plan)
    inputs = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), -1, dtype=torch.long)
    doc_ids = torch.full((B, T), PAD_DOC_ID, dtype=torch.long) if with_doc_ids else None
    num_real = num_supervised = num_conversations = 0
    for r, row in enumerate(plan):
        if row_lengths[r] > T:
            raise ValueError(f"row {r} holds {row_lengths[r]} positions > seq_len {T}")
        pos = 0
        for d, i in enumerate(row):
            ids, mask = examples[i]
            n = len(ids) - 1
            if n <= 0:
                continue
            ids_t = torch.tensor(ids, dtype=torch.long)
            mask_t = torch.tensor(mask[1:], dtype=torch.bool)
            inputs[r, pos:pos + n] = ids_t[:-1]
            targets[r, pos:pos + n] = torch.where(mask_t, ids_t[1:], -1)
            if doc_ids is not None:
                doc_ids[r, pos:pos + n] = d
            num_supervised += int(mask_t.sum())
            num_real += n
            num_conversations += 1
            pos += n
    return Batch(inputs, targets, doc_ids, B * T, num_real, num_supervised, num_conversations)


def batch_for_mode(examples: Sequence[Example], plan: BatchPlan, mode: str, seq_len: int, pad_id: int) -> Batch:
    """The batch each mode feeds the model: eager-dynamic pads to the longest row; compile-pad pads to
    seq_len and needs no document mask (one conversation per row, padding only after it, and causal
    attention never looks ahead); the packed modes pad to seq_len and carry document ids."""
    if mode == "eager-dynamic":
        return build_batch(examples, plan, None, pad_id, with_doc_ids=False)
    if mode == "compile-pad":
        return build_batch(examples, plan, seq_len, pad_id, with_doc_ids=False)
    if mode in PACKED_MODES:
        return build_batch(examples, plan, seq_len, pad_id, with_doc_ids=True)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
