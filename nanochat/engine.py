"""
Inference: KV cache, sampling, multi-sample generation with tool use, and a captured decode step.

How a generation runs (Engine.generate):
1. Prefill: the prompt goes through the model once, at batch 1, into a KV cache preallocated for
   prompt + new tokens.
2. The cache is copied to N rows (one per sample) and every row samples its own first token from
   the prefill logits. (nanochat once sampled one token and broadcast it: N "samples" that all
   started the same way.)
3. Decode: one token per row per step, reading and extending the cache. Rows move in lockstep: a
   token forced in by the calculator also takes a step.

Two caches share one class:
- dynamic (eager): a host-side position; each layer writes its new K/V at [pos, pos+T) and attends
  to the slice [0, pos+T). Cheapest on a CPU: attention touches only the filled part.
- static: positions live in a device tensor (one per row), K/V are scattered in at those positions
  and attention covers the first `attend_len` positions of the buffer under a mask. Every tensor keeps
  its shape and address from step to step, so the step can be captured as a CUDA graph and replayed
  (DecodeStep). DecodeStep sets attend_len to the filled length rounded up to a bucket and keeps one
  graph per bucket, so a step reads the filled part of the cache (and under a bucket more), not
  the whole preallocated buffer. On a CPU the same step runs eagerly, which is how the tests exercise it.
Going past the preallocated length raises KVCacheOverflow; it never reallocates behind the
caller's back (nanochat's in-place resize_ scrambled the cache's layout).
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from nanochat.calculator import use_calculator
from nanochat.errors import ConfigError


class KVCacheOverflow(RuntimeError):
    """More tokens were inserted than the cache was allocated for."""


class KVCache:
    def __init__(self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, static: bool = False):
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.num_layers, self.max_len = batch_size, num_layers, max_len
        self.static = static
        # Host-side count of positions filled (all rows alike). The dynamic path slices with it;
        # both paths check overflow with it, so the check never reads the device.
        self.pos = 0
        # Per-row positions on the device: what a static (captured) step reads and advances.
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._arange = torch.arange(max_len, device=device)
        self._mask = None
        # static: the positions attention reads, [0, attend_len); whoever advances the cache keeps it
        # covering every filled position (DecodeStep: the length bucket of the step)
        self.attend_len = max_len

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, static: bool = False) -> "KVCache":
        c = model.config
        weight = model.transformer.wte.weight
        return cls(batch_size, c.n_layer, c.n_kv_head, c.n_embd // c.n_head, max_len,
                   device=weight.device, dtype=weight.dtype, static=static)

    def reset(self) -> None:
        self.pos = 0
        self.positions.zero_()

    def room(self) -> int:
        return self.max_len - self.pos

    def check_room(self, num_tokens: int) -> None:
        if self.pos + num_tokens > self.max_len:
            raise KVCacheOverflow(
                f"KV cache overflow: {self.pos} positions filled, {num_tokens} more requested, "
                f"{self.max_len} allocated (allocate prompt length + max new tokens)")

    def load_prefix(self, other: "KVCache") -> None:
        """Copy a (batch 1) prefilled cache into every row of this one: the prompt is computed once."""
        n = other.pos
        if other.batch_size != 1 and other.batch_size != self.batch_size:
            raise ValueError(f"cannot copy a cache of {other.batch_size} rows into {self.batch_size}")
        if n > self.max_len:
            raise KVCacheOverflow(f"KV cache overflow: prefix of {n} positions, {self.max_len} allocated")
        self.k[:, :, :, :n] = other.k[:, :, :, :n]   # broadcasts 1 row to all rows
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        self.pos = n
        self.positions.fill_(n)

    # -- the two hooks GPT.forward calls ---------------------------------------------------
    def rotary(self, cos: torch.Tensor, sin: torch.Tensor, T: int):
        """cos/sin for the T positions about to be inserted (tables are (1, L, 1, D/2))."""
        self.check_room(T)
        if self.pos + T > cos.size(1):
            raise KVCacheOverflow(f"position {self.pos + T} is past the rotary table ({cos.size(1)})")
        if not self.static:
            return cos[:, self.pos:self.pos + T], sin[:, self.pos:self.pos + T]
        idx = self.positions[:, None] + self._arange[:T][None, :]          # (B, T), on device
        return cos[0, idx], sin[0, idx]                                     # (B, T, 1, D/2)

    def insert_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, T, D) for a layer; return the keys/values to attend to and
        the attention mask (None: plain causal / attend to everything returned)."""
        B, H, T, D = k.shape
        if not self.static:
            p = self.pos
            self.k[layer_idx, :, :, p:p + T] = k
            self.v[layer_idx, :, :, p:p + T] = v
            mask = None
            if T > 1 and p > 0:
                # a chunk after a prefix: query t sees keys [0, p + t]
                mask = self._arange[:p + T][None, :] <= (p + self._arange[:T])[:, None]
            if layer_idx == self.num_layers - 1:
                self.pos += T
            return self.k[layer_idx, :, :, :p + T], self.v[layer_idx, :, :, :p + T], mask
        # static: scatter at each row's own position; attend over [0, attend_len) under a mask
        L = self.attend_len
        if layer_idx == 0:
            query_pos = self.positions[:, None] + self._arange[:T][None, :]               # (B, T)
            self._mask = (self._arange[None, None, :L] <= query_pos[:, :, None]).unsqueeze(1)  # (B, 1, T, L)
        index = (self.positions[:, None] + self._arange[:T][None, :]).view(B, 1, T, 1).expand(B, H, T, D)
        self.k[layer_idx].scatter_(2, index, k)
        self.v[layer_idx].scatter_(2, index, v)
        if layer_idx == self.num_layers - 1:
            # device-side only; the owner advances self.pos (a replayed graph runs no Python)
            self.positions += T
        return self.k[layer_idx, :, :, :L], self.v[layer_idx, :, :, :L], self._mask


# -----------------------------------------------------------------------------
# Sampling

def sample_next_token(logits: torch.Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1). Each row is drawn independently. temperature 0 = greedy."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits / temperature
    index = None
    if top_k is not None and top_k > 0 and top_k < logits.size(-1):
        logits, index = torch.topk(logits, top_k, dim=-1)
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        choice = order.gather(-1, choice)
    else:
        choice = torch.multinomial(probs, 1, generator=generator)
    return choice if index is None else index.gather(-1, choice)


# -----------------------------------------------------------------------------
# The decode step over a static cache, captured as a CUDA graph where CUDA is present

class DecodeStep:
    """One token per row through the model over a static cache of fixed (batch, max_len).
    Attention reads the cache up to the filled length rounded up to ATTEND_BUCKET positions (the
    step's bucket), not the whole buffer: a decode step's attention reads the cache, so a short
    generation in a long buffer would otherwise read mostly empty positions.
    With capture=True (CUDA only) the step is recorded as a CUDA graph per bucket, when a generation
    first reaches it, and replayed: a small model's decode is otherwise bound by kernel launches,
    not by the GPU. Without capture the very same step runs eagerly (the CPU path, and what the tests run)."""

    ATTEND_BUCKET = 256  # positions: at most this many more are read than filled; max_len / it graphs at most

    def __init__(self, model, batch_size: int, max_len: int, capture: bool = False):
        self.model = model
        self.cache = KVCache.for_model(model, batch_size, max_len, static=True)
        device = self.cache.k.device
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple] = {}   # attend length -> (CUDA graph, its static logits)
        self.busy = False    # set while a generation decodes with this step (its cache is that generation's)
        if capture and device.type != "cuda":
            raise ValueError("CUDA graph capture needs a CUDA device")
        self.capture = capture

    def attend_length(self, filled: int) -> int:
        """The positions a step reads when `filled` positions (this step's included) hold keys."""
        return min(-(-filled // self.ATTEND_BUCKET) * self.ATTEND_BUCKET, self.cache.max_len)

    def _forward(self) -> torch.Tensor:
        return self.model(self.tokens, kv_cache=self.cache)[:, -1]

    @torch.inference_mode()
    def _capture(self) -> tuple:
        # Warm up on a side stream (cuBLAS workspaces, kernel selection) as torch.cuda.graphs
        # recommends. Each warm-up step writes junk K/V at the next positions, which the real steps
        # overwrite before anything attends to them, and advances the device positions: put back.
        positions = self.cache.positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(min(3, self.cache.room())):   # each warm-up step writes one position
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.cache.positions.copy_(positions)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._forward()     # recorded, not run: positions are not advanced
        self.cache.positions.copy_(positions)
        return graph, logits

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, V). With a graph the result lives in a static buffer that the
        next call overwrites: consume it (sample) before stepping again."""
        self.cache.check_room(1)
        self.cache.attend_len = self.attend_length(self.cache.pos + 1)
        if not self.capture:
            logits = self.model(tokens, kv_cache=self.cache)[:, -1]
        else:
            self.tokens.copy_(tokens)
            if self.cache.attend_len not in self.graphs:
                self.graphs[self.cache.attend_len] = self._capture()
            graph, logits = self.graphs[self.cache.attend_len]
            graph.replay()
        self.cache.pos += 1
        return logits


# -----------------------------------------------------------------------------
# The engine

@dataclass
class _RowState:
    """Per-sample bookkeeping for tool use and stopping."""
    forced: deque = field(default_factory=deque)   # tokens to force in next (calculator output)
    in_python: bool = False
    python_tokens: list = field(default_factory=list)
    done: bool = False


def _model_max_len(model) -> int:
    return model.cos.size(1)


class Engine:
    """Generation over a GPT with a KV cache. decode: "eager" (dynamic cache), "static" (the
    capturable step, run eagerly) or "graph" (static step captured as a CUDA graph; CUDA only).
    "auto" picks graph on CUDA and eager elsewhere."""

    def __init__(self, model, tokenizer=None, decode: str = "auto"):
        if decode not in ("auto", "eager", "static", "graph"):
            raise ValueError(f"decode must be auto, eager, static or graph, got {decode!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        if decode == "auto":
            decode = "graph" if self.device.type == "cuda" else "eager"
        if decode == "graph" and self.device.type != "cuda":
            raise ValueError("decode='graph' needs a CUDA device")
        self.decode = decode
        self._steps: dict[tuple[int, int], DecodeStep] = {}   # captured graphs, reused across calls
        self._special = {}
        if tokenizer is not None:
            for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                         "<|assistant_end|>"):
                self._special[name] = tokenizer.encode_special(name)
            self._special["<|bos|>"] = tokenizer.get_bos_token_id()

    # A captured graph is tied to its cache's shape and addresses, so graphs are kept and reused. The
    # cache length is rounded up to a bucket so a chat (a new total length every turn) reuses a few
    # graphs instead of capturing one per turn; the oldest is dropped past MAX_GRAPHS.
    GRAPH_BUCKET = 256
    MAX_GRAPHS = 4

    def _decode_step(self, batch_size: int, max_len: int) -> DecodeStep:
        if self.decode != "graph":
            return DecodeStep(self.model, batch_size, max_len, capture=False)
        bucketed = -(-max_len // self.GRAPH_BUCKET) * self.GRAPH_BUCKET
        max_len = min(max(bucketed, max_len), _model_max_len(self.model))
        key = (batch_size, max_len)
        step = self._steps.pop(key, None)
        if step is not None and step.busy:
            # another generation of this engine (an unfinished generator) owns that cache: never share it
            self._steps[key] = step
            return DecodeStep(self.model, batch_size, max_len, capture=True)
        if step is None:
            step = DecodeStep(self.model, batch_size, max_len, capture=True)
        self._steps[key] = step                    # (re)insert: the dict's order is least recently used first
        while len(self._steps) > self.MAX_GRAPHS:
            self._steps.pop(next(iter(self._steps)))
        return step

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 42, use_tools: bool = True, stop_at_end: bool = True,
                 first_token: str = "independent", on_logits=None,
                 ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, per step, (token of each row, mask of each row): mask 1 for sampled tokens, 0 for
        tokens forced in by the calculator. Rows that finished (<|assistant_end|> or <|bos|>) keep
        being yielded until all have finished (when stop_at_end), as in nanochat.
        first_token="broadcast" reproduces the original nanochat bug (one first token sampled at
        batch 1 and copied to every row); it exists only so benchmarks can measure the fix against it.
        on_logits(logits), if given, sees the (rows, vocab) logits each token is sampled from, the
        prefill's first; with decode="graph" they live in a buffer the next step overwrites (copy them).
        check_decode uses it to hold the cached decode against a full forward."""
        if not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("tokens must be a non-empty list of ints")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if first_token not in ("independent", "broadcast"):
            raise ValueError(f"first_token must be 'independent' or 'broadcast', got {first_token!r}")
        if max_tokens is None:
            max_tokens = self.model.config.sequence_len - len(tokens)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (prompt of {len(tokens)} tokens)")
        total = len(tokens) + max_tokens
        if total > _model_max_len(self.model):
            raise ValueError(f"prompt + max_tokens = {total} is past the model's rotary table ({_model_max_len(self.model)})")
        tools = use_tools and self.tokenizer is not None
        stopping = stop_at_end and self.tokenizer is not None
        device = self.device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        # 1. prefill once, at batch 1 (sized for the whole generation only when it decodes in place)
        in_place = self.decode == "eager" and num_samples == 1
        prefill = KVCache.for_model(self.model, 1, total if in_place else len(tokens))
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        logits = self.model(ids, kv_cache=prefill)[:, -1]            # (1, V)

        # 2. decode state: the same cache when one sample decodes eagerly, else a copy per row
        if self.decode == "eager":
            if in_place:
                cache = prefill
            else:
                cache = KVCache.for_model(self.model, num_samples, total)
                cache.load_prefix(prefill)

            def step(x):
                return self.model(x, kv_cache=cache)[:, -1]
        else:
            step = self._decode_step(num_samples, total)
            step.cache.load_prefix(prefill)
            step.busy = True
        del prefill
        try:
            if on_logits is not None:
                on_logits(logits.expand(num_samples, -1))
            # every row draws its own first token from the prefill logits
            if first_token == "independent":
                sampled = sample_next_token(logits.expand(num_samples, -1), generator, temperature, top_k, top_p)
            else:
                sampled = sample_next_token(logits, generator, temperature, top_k, top_p).expand(num_samples, -1)
            rows = [_RowState() for _ in range(num_samples)] if (tools or stopping) else None
            sp = self._special
            for i in range(max_tokens):
                chosen = sampled.view(-1).tolist()       # the one host read per step (streaming needs it)
                masks = [1] * num_samples
                forced_any = False
                if rows is not None:
                    for r, row in enumerate(rows):
                        if row.forced:
                            chosen[r] = row.forced.popleft()
                            masks[r] = 0
                            forced_any = True
                        token = chosen[r]
                        if stopping and token in (sp["<|assistant_end|>"], sp["<|bos|>"]):
                            row.done = True
                        if tools:
                            if token == sp["<|python_start|>"]:
                                row.in_python, row.python_tokens = True, []
                            elif token == sp["<|python_end|>"] and row.in_python:
                                row.in_python = False
                                result = use_calculator(self.tokenizer.decode(row.python_tokens))
                                if result is not None:
                                    row.forced.append(sp["<|output_start|>"])
                                    row.forced.extend(self.tokenizer.encode(result))
                                    row.forced.append(sp["<|output_end|>"])
                            elif row.in_python:
                                row.python_tokens.append(token)
                yield chosen, masks
                if i == max_tokens - 1 or (stopping and all(row.done for row in rows)):
                    break
                x = torch.tensor(chosen, dtype=torch.long, device=device).view(-1, 1) if forced_any else sampled
                logits = step(x)
                if on_logits is not None:
                    on_logits(logits)
                sampled = sample_next_token(logits, generator, temperature, top_k, top_p)
        finally:
            if isinstance(step, DecodeStep):
                step.busy = False

    def generate_batch(self, tokens: list[int], num_samples: int = 1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples, each the prompt plus what was generated up to (not including) its end token."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        ends = {self._special.get("<|assistant_end|>"), self._special.get("<|bos|>")} - {None}
        for column, mask_column in self.generate(tokens, num_samples=num_samples, **kwargs):
            for r, (token, m) in enumerate(zip(column, mask_column)):
                if done[r]:
                    continue
                if token in ends:
                    done[r] = True
                else:
                    results[r].append(token)
                    masks[r].append(m)
            if all(done):
                break
        return results, masks


# -----------------------------------------------------------------------------
# The baseline: no cache at all

@torch.inference_mode()
def generate_naive(model, tokens: list[int], max_tokens: int, num_samples: int = 1, temperature: float = 0.0,
                   top_k: int | None = None, seed: int = 42) -> list[list[int]]:
    """The original O(T^2) generate: a full forward over the whole sequence for every new token.
    Returns the new tokens of each row (no tools, no stopping): the reference the cache must match."""
    device = model.get_device()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    ids = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    for _ in range(max_tokens):
        logits = model(ids)[:, -1]
        ids = torch.cat([ids, sample_next_token(logits, generator, temperature, top_k)], dim=1)
    return ids[:, len(tokens):].tolist()


# -----------------------------------------------------------------------------
# The decode check: the cached decode against a full forward, in fp32

# Largest |logit difference| a correct cache shows against the full forward in fp32 (summation order
# differs: a few 1e-6 here); a cache that misplaces one position moves logits by O(1).
DECODE_CHECK_TOLERANCE = 1e-3


@contextmanager
def full_fp32_matmuls():
    """fp32 matmuls at full precision for the block: compute_init lets CUDA use TF32 (10-bit
    mantissa) for training, which would blur a check that must tell numerics from a bug."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@torch.inference_mode()
def check_decode(model, tokens: list[int], max_tokens: int, num_samples: int = 1, decode: str = "eager",
                 tolerance: float = DECODE_CHECK_TOLERANCE) -> dict:
    """Greedy decode through Engine(decode=...) (eager cache, static cache, or the CUDA graph), then one
    full forward without a cache over each row's prompt + generated tokens: at every step its logits
    are what naive recompute computes there. The largest difference must stay within `tolerance`.
    Comparing logits on the decode's own tokens (teacher forcing) tells a broken cache from a
    near-tie that flips a greedy token. The model must be in fp32 (bf16 rounding is larger than
    some cache bugs); run it under full_fp32_matmuls() on CUDA."""
    dtype = model.transformer.wte.weight.dtype
    if dtype != torch.float32:
        raise ValueError(f"check_decode needs an fp32 model (got {dtype}): bf16 rounding hides cache bugs")
    steps = []
    engine = Engine(model, decode=decode)
    generated = [[] for _ in range(num_samples)]
    for column, _ in engine.generate(tokens, num_samples=num_samples, max_tokens=max_tokens, temperature=0.0,
                                     use_tools=False, stop_at_end=False,
                                     on_logits=lambda logits: steps.append(logits.float().clone())):
        for r, token in enumerate(column):
            generated[r].append(token)
    cached = torch.stack(steps, dim=1)                                     # (rows, steps, vocab)
    ids = torch.tensor([list(tokens) + row[:-1] for row in generated], dtype=torch.long, device=cached.device)
    full = model(ids)[:, len(tokens) - 1:]                                 # (rows, steps, vocab)
    per_step = (full - cached).abs().amax(dim=(0, 2))
    worst = float(per_step.max())
    bad = (~(per_step <= tolerance)).nonzero()   # NaN counts as bad
    return {"decode": decode, "max_logit_diff": worst, "tolerance": tolerance, "ok": worst <= tolerance,
            "first_bad_step": int(bad[0]) if len(bad) else None, "tokens": generated}


# -----------------------------------------------------------------------------
# Decode precision: what the weights are stored in while generating

# fp32: the exact reference (every baseline and check_decode). bf16: half the bytes (CUDA's default).
# int8: weight-only int8 with one scale per output channel, activations in bf16 (torch's
# _weight_int8pack_mm, the kernel gpt-fast and torchao use on CPU): a quarter of fp32's bytes, and a
# batch-1 decode step is bound by reading the weights. It needs fast bf16 on the CPU (AMX or
# AVX512-BF16): without them its bf16 activations are emulated and it is slower than fp32.
DECODE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
INT8_CPU_ONLY = ("int8 is for CPUs: torch's _weight_int8pack_mm has no CUDA kernel; "
                 "on CUDA use bf16 (what auto takes there)")


def decode_precision_route(choice: str, device: torch.device | str) -> str:
    """The precision `choice` means on `device`: auto is bf16 on CUDA, int8 on a CPU with fast bf16,
    fp32 on any other CPU (and mps)."""
    from nanochat.cpu_features import cpu_has_fast_bf16
    if choice not in DECODE_PRECISIONS:
        raise ValueError(f"decode precision {choice!r}: choose one of {', '.join(DECODE_PRECISIONS)}")
    device = torch.device(device)
    if choice == "int8" and device.type == "cuda":
        raise ConfigError(f"decode precision {INT8_CPU_ONLY}")
    if choice != "auto":
        return choice
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "int8"
    return "fp32"


class Int8Linear(torch.nn.Module):
    """A bias-free nn.Linear with its weight stored as int8 rows and one bf16 scale per row
    (symmetric, round to nearest). Inputs are cast to bf16; outputs are bf16."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear: the model's linears have no bias")
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        return torch._weight_int8pack_mm(x2, self.weight, self.scale).view(*shape[:-1], self.out_features)


def quantize_int8_(model):
    """In place: bf16 everywhere, then every nn.Linear (blocks and lm_head) as an Int8Linear. The
    embedding stays bf16 (a lookup reads one row per token, not the matrix)."""
    model.to(torch.bfloat16)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model


def prepare_for_inference(model, precision: str = "auto"):
    """In place: eval mode and the decode precision (decode_precision_route); returns the precision
    used. Decode is bound by reading the weights, so fewer bytes per weight is the speed."""
    model.eval()
    route = decode_precision_route(precision, model.get_device())
    if route == "bf16":
        model.to(torch.bfloat16)
    elif route == "int8":
        quantize_int8_(model)
    else:
        model.float()
    return route
