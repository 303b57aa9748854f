"""
Token streams for training. The corpus is cut into `num_streams` interleaved streams (stream s
takes row groups / conversations s, s+S, s+2S, ...); each rank reads the streams r, r+W, ...
With the default num_streams = world_size this is the usual rank-strided loader; a fixed
num_streams keeps the data of each optimizer step the same whatever the number of ranks (one
process with two streams sees exactly what two ranks see), which is also what the tests use.

A stream emits rows of T+1 tokens (inputs = row[:-1], targets = row[1:]), documents prefixed with
<|bos|> and concatenated; consecutive rows overlap by one token, as nanochat's loader does.
Its position is a small dict (row group, document offset, leftover tokens, epoch): saved in
checkpoints and restored on resume, so a resumed run sees exactly the same rows.
"""
from __future__ import annotations

import queue
import random
import threading
from pathlib import Path
from typing import Callable

import torch

from nanochat.errors import ConfigError
from nanochat.dataset import open_shard, read_row_group

TOKENIZE_CHUNK = 32  # documents tokenized per refill (a batch call uses tiktoken's threads)


class ShardStream:
    """One stream over parquet shards: row groups s, s+S, ... of the concatenated shard list."""

    def __init__(self, shards: list[Path], tokenizer, stream: int, num_streams: int, max_epochs: int | None = None):
        self.shards = [Path(p) for p in shards]
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.max_epochs = max_epochs
        self._files = [open_shard(p) for p in self.shards]
        all_groups = [(si, gi) for si, pf in enumerate(self._files) for gi in range(pf.num_row_groups)]
        self.groups = all_groups[stream::num_streams]
        if not self.groups:
            raise ConfigError(f"{self.shards[0].parent}: {len(all_groups)} row groups is fewer than the "
                              f"{num_streams} data streams (ranks); write smaller row groups or more shards")
        self.stream, self.num_streams = stream, num_streams
        self.epoch, self.group, self.offset = 0, 0, 0
        self.buffer: list[int] = []
        self._cache_key = None
        self._cache_docs: list[str] = []

    def _docs(self) -> list[str]:
        key = self.groups[self.group]
        if key != self._cache_key:
            si, gi = key
            self._cache_docs = read_row_group(self._files[si], gi, self.shards[si])
            self._cache_key = key
        return self._cache_docs

    def _refill(self) -> None:
        docs = self._docs()
        if self.offset >= len(docs):
            self.group += 1
            self.offset = 0
            if self.group == len(self.groups):
                self.group = 0
                self.epoch += 1
                if self.max_epochs is not None and self.epoch >= self.max_epochs:
                    raise StopIteration
            return
        chunk = docs[self.offset:self.offset + TOKENIZE_CHUNK]
        for ids in self.tokenizer.encode(chunk, prepend=self.bos):
            self.buffer.extend(ids)
        self.offset += len(chunk)

    def take_rows(self, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n rows of T+1 tokens, and their loss mask (all ones for pretraining text)."""
        need = n * T + 1
        while len(self.buffer) < need:
            self._refill()
        flat = torch.tensor(self.buffer[:need], dtype=torch.long)
        self.buffer = self.buffer[n * T:]
        rows = torch.stack([flat[i * T:(i + 1) * T + 1] for i in range(n)])
        return rows, torch.ones_like(rows, dtype=torch.bool)

    def state_dict(self) -> dict:
        si, gi = self.groups[self.group]
        return {"kind": "shards", "stream": self.stream, "num_streams": self.num_streams, "epoch": self.epoch,
                "group": self.group, "shard": self.shards[si].name, "row_group": gi, "offset": self.offset,
                "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_streams") != self.num_streams or state.get("stream") != self.stream:
            raise ConfigError(f"loader state is for stream {state.get('stream')} of {state.get('num_streams')}, "
                              f"not {self.stream} of {self.num_streams} (num_streams must not change on resume)")
        self.epoch, self.group, self.offset = int(state["epoch"]), int(state["group"]), int(state["offset"])
        self.buffer = [int(t) for t in state["buffer"]]


class ConversationStream:
    """One stream over rendered conversations (conversation s, s+S, ...), shuffled per epoch with a
    fixed seed, concatenated. The mask marks tokens that carry loss (assistant text and tool calls)."""

    def __init__(self, conversations: list[dict], tokenizer, stream: int, num_streams: int, seed: int = 0,
                 max_tokens: int = 2048, max_epochs: int | None = None):
        self.conversations = conversations[stream::num_streams]
        if not self.conversations:
            raise ConfigError(f"{len(conversations)} conversations is fewer than the {num_streams} data streams")
        self.tokenizer, self.seed, self.max_tokens, self.max_epochs = tokenizer, seed, max_tokens, max_epochs
        self.stream, self.num_streams = stream, num_streams
        self.epoch, self.index = 0, 0
        self.buffer: list[int] = []
        self.mask: list[int] = []
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.conversations)))
        random.Random(self.seed * 1_000_003 + self.stream * 1009 + self.epoch).shuffle(order)
        return order

    def _refill(self) -> None:
        if self.index >= len(self.conversations):
            self.index = 0
            self.epoch += 1
            if self.max_epochs is not None and self.epoch >= self.max_epochs:
                raise StopIteration
            self._order = self._make_order()
        ids, mask = self.tokenizer.render_conversation(self.conversations[self._order[self.index]], self.max_tokens)
        self.buffer.extend(ids)
        self.mask.extend(mask)
        self.index += 1

    def take_rows(self, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        need = n * T + 1
        while len(self.buffer) < need:
            self._refill()
        flat = torch.tensor(self.buffer[:need], dtype=torch.long)
        flat_mask = torch.tensor(self.mask[:need], dtype=torch.bool)
        self.buffer, self.mask = self.buffer[n * T:], self.mask[n * T:]
        rows = torch.stack([flat[i * T:(i + 1) * T + 1] for i in range(n)])
        masks = torch.stack([flat_mask[i * T:(i + 1) * T + 1] for i in range(n)])
        return rows, masks

    def state_dict(self) -> dict:
        return {"kind": "conversations", "stream": self.stream, "num_streams": self.num_streams,
                "epoch": self.epoch, "index": self.index, "buffer": list(self.buffer), "mask": list(self.mask)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_streams") != self.num_streams or state.get("stream") != self.stream:
            raise ConfigError(f"loader state is for stream {state.get('stream')} of {state.get('num_streams')}, "
                              f"not {self.stream} of {self.num_streams} (num_streams must not change on resume)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.buffer = [int(t) for t in state["buffer"]]
        self.mask = [int(m) for m in state["mask"]]
        self._order = self._make_order()


class RankLoader:
    """The streams one rank owns. next_step_rows(rows_per_rank) returns this rank's share of an
    optimizer step as (R, T+1) token rows and masks, stream-major; micro-batches are slices of it,
    so a step can be re-split into smaller micro-batches (OOM fallback) without losing data."""

    def __init__(self, make_stream, seq_len: int, rank: int, world_size: int, num_streams: int = 0):
        num_streams = num_streams or world_size
        if num_streams % world_size:
            raise ConfigError(f"num_streams={num_streams} must be a multiple of world_size={world_size}")
        self.T = seq_len
        self.stream_ids = list(range(rank, num_streams, world_size))
        self.streams = [make_stream(s, num_streams) for s in self.stream_ids]

    def next_step_rows(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.streams)
        if rows % k:
            raise ConfigError(f"{rows} rows per rank per step do not split over {k} data streams per rank")
        parts = [s.take_rows(rows // k, self.T) for s in self.streams]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def next_batch(self, B: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of shape (B, T); targets are -1 where no loss is taken."""
        rows, mask = self.next_step_rows(B)
        return rows_to_batch(rows, mask, device)

    def state_dict(self) -> dict:
        return {str(s): st.state_dict() for s, st in zip(self.stream_ids, self.streams)}

    def load_state_dict(self, states: dict) -> None:
        for s, st in zip(self.stream_ids, self.streams):
            if str(s) not in states:
                raise ConfigError(f"checkpoint has no loader state for data stream {s} (saved streams: {sorted(states)})")
            st.load_state_dict(states[str(s)])


def rows_to_batch(rows: torch.Tensor, mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) on `device`. The rows are copied first and sliced there: on CUDA the copy
    of pinned rows (StepRows) is non-blocking, and no unpinned host tensor is made on the way."""
    non_blocking = torch.device(device).type == "cuda"
    rows, mask = rows.to(device, non_blocking=non_blocking), mask.to(device, non_blocking=non_blocking)
    inputs = rows[:, :-1].contiguous()
    targets = torch.where(mask[:, 1:], rows[:, 1:], torch.full_like(rows[:, 1:], -1))
    return inputs, targets


class Prefetcher:
    """Hands out make()'s results `count` times, in order. background=True calls make() in a daemon
    thread one result ahead of the consumer (tokenising, building and pinning the next step's batch
    while this step computes); False calls it when asked (the plain path). An error in the thread is
    raised by the next next(); close() stops the thread (it never outlives a run)."""

    def __init__(self, make: Callable, count: int, background: bool = False):
        self.make, self.count = make, count
        self._thread = None
        if background and count > 0:
            self._queue: queue.Queue = queue.Queue()
            self._slot = threading.Semaphore(1)  # one ahead, no more (pinned memory, data position)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._produce, name="nanochat-prefetch", daemon=True)
            self._thread.start()

    def _produce(self) -> None:
        for _ in range(self.count):
            while not self._slot.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            try:
                item = ("ok", self.make())
            except BaseException as exc:  # StopIteration (data epochs exhausted) included: the loop sees it
                item = ("error", exc)
            self._queue.put(item)
            if item[0] == "error":
                return

    def next(self):
        if self._thread is None:
            return self.make()
        while True:
            try:
                kind, payload = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the batch prefetch thread ended without handing over a batch") from None
        if kind == "error":
            raise payload
        self._slot.release()  # the next one may be made now
        return payload

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)  # at most one make() in progress to wait for
            self._thread = None


class StepRows:
    """Feeds the training loop one optimizer step's rows at a time (RankLoader.next_step_rows).
    background=True prepares step k+1 in a daemon thread while step k computes (Prefetcher:
    tokenising, and pinning the rows on CUDA so their copy is non-blocking); False reads them when
    asked (the plain path). state_dict() is the loader position after the rows handed out so far,
    never after the prefetched ones, so a checkpoint resumes exactly where the trained rows end."""

    def __init__(self, loader: RankLoader, rows: int, steps: int, background: bool = False, pin: bool = False):
        self.loader, self.rows, self.steps, self.pin = loader, rows, steps, pin
        self._consumed_state = loader.state_dict()
        self._handed = 0
        self._ahead = Prefetcher(self._take, steps, background)

    def _take(self):
        rows, mask = self.loader.next_step_rows(self.rows)
        if self.pin:
            rows, mask = rows.pin_memory(), mask.pin_memory()
        return rows, mask, self.loader.state_dict()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._handed >= self.steps:
            raise RuntimeError(f"StepRows: all {self.steps} steps were handed out")
        rows, mask, state = self._ahead.next()
        self._handed += 1
        self._consumed_state = state
        return rows, mask

    def state_dict(self) -> dict:
        return self._consumed_state

    def close(self) -> None:
        self._ahead.close()


def pretraining_loader(shards, tokenizer, seq_len: int, rank: int = 0, world_size: int = 1,
                       num_streams: int = 0, max_epochs: int | None = None) -> RankLoader:
    return RankLoader(lambda s, n: ShardStream(shards, tokenizer, s, n, max_epochs), seq_len, rank, world_size, num_streams)


def conversation_loader(conversations, tokenizer, seq_len: int, rank: int = 0, world_size: int = 1,
                        num_streams: int = 0, seed: int = 0, max_epochs: int | None = None) -> RankLoader:
    return RankLoader(lambda s, n: ConversationStream(conversations, tokenizer, s, n, seed, max_epochs=max_epochs),
                      seq_len, rank, world_size, num_streams)
