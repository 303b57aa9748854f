"""
Chat SFT: fine-tune on conversations, loss on the assistant's tokens only.

Four ways to batch (SFTConfig.mode), so the cost of each can be measured side by side:
- "eager-dynamic": pad each batch to its longest conversation, no compile (the original baseline).
- "compile-pad":   pad every row to max_seq_len, torch.compile(dynamic=False): one shape, much padding.
- "compile-pack":  best-fit several whole conversations into each fixed (B, T) row, attention kept
                   inside each conversation, torch.compile(dynamic=False). The default.
- "eager-pack":    the same packed rows, no compile: compile-pack / eager-pack is what compiling gives,
                   compile-pack / compile-pad what packing gives.

Attention route for packed rows (GPT.forward(doc_ids=...), nanochat.gpt.doc_attention_route): on CUDA
FlexAttention with a block mask built from the document ids, compiled, so blocks wholly across documents
or above the diagonal are skipped; elsewhere scaled_dot_product_attention with the dense boolean
block-diagonal causal mask, because FlexAttention has no backward on CPU in torch 2.13 and this product
trains on CPU for its tests and smoke pipeline. Both compute the same loss (tests/test_packing.py).

The loss is summed per micro-batch and divided by the number of supervised tokens in the whole
optimizer step, counted over all micro-batches and all ranks before the first backward (nanochat
PR 400), so every supervised token weighs the same however the conversations fell into batches.

Throughput is honest: tokens/s over all positions, over real (non-padding) positions and over
supervised positions, plus the padding fraction. The first optimizer step (compilation) is kept out
of the timed window and reported on its own.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nanochat.device import device_name, peak_memory_bytes, reset_peak_memory, synchronize
from nanochat.distributed import compute_init, print0
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, get_base_dir, git_commit
from nanochat.peaks import device_peaks
from nanochat.dataloader import Prefetcher
from nanochat.datasets_chat import read_mixture
from nanochat.gpt import GPT, CompiledGPT, GPTConfig, build_model, doc_attention_route
from nanochat.optim import GradientBuckets, all_reduce_gradients, build_optimizers, zero_gradients
from nanochat.packing import MODES, PACKED_MODES, Example, batch_for_mode, plan_batches, truncate
from nanochat.synthetic import generate_conversations
from nanochat.tokenizer import Tokenizer
from nanochat.train_loop import (OOM_FALLBACK_SOURCES, _any_rank, _oom_handlers, read_metrics, source_after_oom,
                                 write_metrics)

ATTENTION_NAMES = {"flex": "flex-document-mask", "sdpa": "sdpa-bool-mask"}  # row extra "attention"


@dataclass
class SFTConfig:
    # filled by the jobs layer (docs/CONTRACTS.md)
    base_dir: str = ""          # shared artifacts; "" -> nanochat.files.get_base_dir()
    out_dir: str = ""           # this stage's folder: checkpoints/ and metrics.csv go here; "" = nothing written
    init_from: str = ""         # checkpoint folder of the model to fine-tune; "" = a fresh model (benchmarks, tests)
    device_type: str = ""       # "" = auto (cuda, else cpu)
    # what to run
    mode: str = "compile-pack"  # eager-dynamic | eager-pack | compile-pad | compile-pack
    data_path: str = ""         # JSONL or parquet of {"messages": [...]}; "" = the offline synthetic set
    num_conversations: int = 2000   # size of the synthetic set when data_path is ""
    val_conversations: int = 64     # held out (taken from the end of the data) for the validation loss
    seed: int = 0
    max_seq_len: int = 1024     # T: tokens per row; longer conversations are truncated
    device_batch_size: int = 0  # rows per micro-batch; 0 = automatic (nanochat.auto_batch_size)
    total_batch_size: int = 0   # positions (rows x T) per optimizer step over all ranks; 0 = one micro-batch per rank
    num_epochs: int = 1
    max_steps: int = 0          # cap on optimizer steps (0 = no cap)
    pack_buffer: int = 512      # conversations considered at once by best-fit packing
    warmup_steps: int = 1       # optimizer steps left out of the timed window (compilation happens here)
    # a fresh model when init_from is "" (its tokenizer is trained on the conversations)
    depth: int = 4
    vocab_size: int = 2048
    # optimization (nanochat's SFT: base learning rates x init_lr_frac, decaying linearly to zero)
    matrix_lr: float = 0.02
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02
    eval_batch_size: int = 8
    save_checkpoint: bool = True
    overlap: bool = True        # several ranks: all-reduce in buckets during backward, shard Muon; false = plain path
    peak_flops: float = 0.0     # bf16 dense FLOP/s of one device for MFU; 0 = peaks.device_peaks' table/fallback

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"sft.mode: unknown mode {self.mode!r} (choose one of {', '.join(MODES)})")
        for key in ("max_seq_len", "num_epochs", "eval_batch_size", "pack_buffer", "depth"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sft.{key}: must be at least 1 (got {getattr(self, key)})")
        for key in ("device_batch_size", "total_batch_size", "max_steps", "warmup_steps", "val_conversations",
                    "peak_flops"):
            if getattr(self, key) < 0:
                raise ConfigError(f"sft.{key}: must not be negative (got {getattr(self, key)})")
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"sft.overlap: expected true or false (got {self.overlap!r})")
        if not self.data_path and self.num_conversations < 2:
            raise ConfigError(f"sft.num_conversations: need at least 2 (got {self.num_conversations})")
        from nanochat.datasets_chat import CHAT_SETS, mixture_parts
        for part, _ in mixture_parts(self.data_path):   # fetched sets are checked when they are read
            if part not in CHAT_SETS and not Path(part).exists():
                raise ConfigError(f"sft.data_path: {part} does not exist")


# -----------------------------------------------------------------------------
# Data

def load_conversations(path: str | os.PathLike, base_dir: str | os.PathLike = "", seed: int = 0) -> list[dict]:
    """Conversations from JSONL (one {"messages": [...]} per line) or parquet (a `messages` column),
    or a mixture of those and fetched sets (smoltalk:10000+gsm8k, nanochat.datasets_chat);
    ConfigError naming the file (and line) when they are malformed."""
    return read_mixture(str(path), base_dir or get_base_dir(), seed)


def synthetic_conversations(n: int, seed: int, max_tokens: int) -> list[dict]:
    """The offline synthetic set (nanochat.synthetic): long-tailed lengths, most conversations a few
    hundred tokens, a few near max_tokens."""
    return generate_conversations(n, seed=seed, max_tokens=max_tokens)


def conversation_texts(conversations: list[dict]):
    for conv in conversations:
        for message in conv["messages"]:
            content = message["content"]
            if isinstance(content, str):
                yield content
            else:
                for part in content:
                    yield part["text"]


def render_examples(conversations: list[dict], tokenizer: Tokenizer, max_seq_len: int, source: str) -> list[Example]:
    examples = []
    for i, conv in enumerate(conversations):
        try:
            ids, mask = tokenizer.render_conversation(conv, max_tokens=max_seq_len + 1)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: conversation {i}: {e}") from None
        examples.append(truncate((ids, mask), max_seq_len))
    return examples


# -----------------------------------------------------------------------------
# Model, tokenizer, batch size, compilation

class CompileCounter:
    """A torch.compile backend that counts the graphs handed to it (one per compilation or
    recompilation of a frame) and then compiles them with inductor as the default backend does."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)


def fresh_model(cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device) -> GPT:
    torch.manual_seed(cfg.seed)
    config = GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len)
    return build_model(config, device)


def load_or_build(cfg: SFTConfig, conversations: list[dict], device: torch.device) -> tuple[GPT, Tokenizer, dict]:
    """The model to fine-tune: from init_from (via nanochat.checkpoint), or a fresh one with a tokenizer
    trained on the conversations themselves (benchmarks and tests need no earlier stage)."""
    if cfg.init_from:
        from nanochat.checkpoint import load_model
        model, tokenizer, meta = load_model(cfg.init_from, device)
        return model, tokenizer, dict(meta or {})
    saved = Path(cfg.out_dir) / "tokenizer" if cfg.out_dir else None
    if saved is not None and (saved / "tokenizer.json").exists():  # a resumed run keeps its tokenizer
        tokenizer = Tokenizer.load(saved)
    else:
        tokenizer = Tokenizer.train(conversation_texts(conversations), cfg.vocab_size)
    return fresh_model(cfg, tokenizer, device), tokenizer, {}


@dataclass
class SFTTrialStep:
    """The automatic batch size's trial step for SFT: a training step on random tokens shaped like
    this mode's batches (rows of max_seq_len; packed rows carry document ids, so the trial also holds
    the attention mask). A dataclass so it pickles into the CPU probe's memory-budgeted child."""
    seq_len: int
    vocab_size: int
    packed: bool
    world_size: int = 1

    def __call__(self, model, optimizers, batch_size: int) -> None:
        device = next(model.parameters()).device
        x = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), device=device)
        y = torch.randint(0, self.vocab_size, (batch_size, self.seq_len), device=device)
        # contiguous, as packing.build_batch makes them: a compiled trial then meets training's guards
        doc_ids = ((torch.arange(self.seq_len, device=device) // 256).repeat(batch_size, 1).contiguous()
                   if self.packed else None)
        from nanochat.auto_batch_size import reserve_gradient_buckets, reserve_muon_gather
        buckets = reserve_gradient_buckets(model) if self.world_size > 1 else None
        with autocast_context(device):
            loss = model(x, y, doc_ids=doc_ids, loss_reduction="sum") / y.numel()
        loss.backward()
        gathered = reserve_muon_gather(optimizers) if self.world_size > 1 else None
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        del buckets, gathered


def build_sft_optimizers(model):
    """The optimizers the probe's trials allocate (same state sizes as training's)."""
    return build_optimizers(model)


def default_total_batch_size(cfg: SFTConfig, world_size: int) -> int:
    """Positions per optimizer step: the config's, else 32 rows per rank (nanochat's 32 examples per step)."""
    return cfg.total_batch_size or 32 * cfg.max_seq_len * world_size


def compile_sft(model: GPT) -> tuple[torch.nn.Module, CompileCounter]:
    """THE compile of SFT's compiled modes: fixed shapes (dynamic=False), graphs counted. Fresh dynamo
    caches first: a second model in this process must not eat the recompile limit."""
    counter = CompileCounter()
    torch._dynamo.reset()
    return CompiledGPT(model, backend=counter), counter  # by region: GradientBuckets overlaps backward


def probe_compiles(cfg: SFTConfig, device: torch.device) -> bool:
    """Does the automatic batch size confirm its size with a compiled step? On CUDA for a compiled mode
    (the compiled step's kernels and workspaces differ from eager's); on a CPU the compiled step uses
    no more memory than the eager one, so no compilation is paid there."""
    return cfg.device_batch_size == 0 and cfg.mode.startswith("compile") and device.type == "cuda"


def resolve_batch_size(cfg: SFTConfig, model: GPT, world_size: int, device: torch.device,
                       compiled=None) -> tuple[int, str, dict]:
    """device_batch_size from the config, or (0) from the automatic batch size (probe or cache).
    The size is searched eager (a compile per trial size otherwise: the modes compile with
    dynamic=False) and, where probe_compiles, confirmed by one step of `compiled` (compile_sft's
    module, which the training then steps: that one compile serves both)."""
    if cfg.device_batch_size > 0:
        return cfg.device_batch_size, "config", {}
    from nanochat.auto_batch_size import resolve_device_batch_size
    step = SFTTrialStep(cfg.max_seq_len, model.config.vocab_size, cfg.mode in PACKED_MODES, world_size)
    dbs, _accum, source, info = resolve_device_batch_size(
        model, build_sft_optimizers, cfg.max_seq_len, default_total_batch_size(cfg, world_size), world_size, device,
        step_fn=step, compile=probe_compiles(cfg, device), base_dir=cfg.base_dir or None,
        cache_extra={"recipe": "sft", "mode": cfg.mode}, compiled=compiled, compiled_search=False)
    return int(dbs), str(source), dict(info or {})


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA (as nanochat trains); fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    if total_batch_size == 0:
        return 1
    per_micro = device_batch_size * seq_len * world_size
    if total_batch_size % per_micro:
        raise ConfigError(f"sft.total_batch_size: {total_batch_size} is not a multiple of "
                          f"device_batch_size x max_seq_len x world_size = {per_micro}")
    return total_batch_size // per_micro


# -----------------------------------------------------------------------------
# Loss

def summed_loss(model, examples: list[Example], mode: str, batch_size: int, seq_len: int, pad_id: int,
                pack_buffer: int = 512) -> tuple[float, int]:
    """(sum of per-token losses over supervised tokens, number of supervised tokens) over `examples`,
    batched the way `mode` batches them. Independent of batching when the masking is right."""
    lengths = [len(ids) - 1 for ids, _ in examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for plan in plan_batches(lengths, mode, batch_size, seq_len, pack_buffer):
            b = batch_for_mode(examples, plan, mode, seq_len, pad_id).to(device)
            with autocast_context(device):
                loss = model(b.inputs, b.targets, doc_ids=b.doc_ids, loss_reduction="sum")
            total += float(loss.double())
            count += b.num_supervised
    return total, count


def evaluate(model: GPT, examples: list[Example], batch_size: int, seq_len: int, pad_id: int) -> float | None:
    """Mean loss per supervised token on held-out conversations, with the uncompiled module."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = summed_loss(model, examples, "eager-dynamic", batch_size, seq_len, pad_id)
    model.train(was_training)
    return total / count if count else None


# -----------------------------------------------------------------------------
# Checkpoints (nanochat.checkpoint owns the format; the SFT state rides in its meta)

def checkpoint_dir(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def save_sft_checkpoint(cfg: SFTConfig, model: GPT, tokenizer_dir: str, optimizers, step: int, meta: dict) -> Path:
    """out_dir/checkpoints/step_NNNNNN in nanochat.checkpoint's format, loadable by load_model()."""
    from nanochat.checkpoint import save_checkpoint
    kept = {k: v for k, v in meta.items() if k not in ("path", "step", "python_rng")}
    meta = dict(kept, stage="sft", model_config=model.config.to_dict(), tokenizer_dir=tokenizer_dir,
                sft_config=asdict(cfg), sft_mode=cfg.mode, init_from=cfg.init_from)
    return save_checkpoint(checkpoint_dir(cfg.out_dir), step, model, optimizers, meta)


def try_resume(cfg: SFTConfig, model: GPT, optimizers, device: torch.device) -> tuple[int, dict]:
    """(step to start from, that checkpoint's meta): the newest valid SFT checkpoint in out_dir/checkpoints,
    or (0, {}) if none. The epoch plan is a function of the seed and the planned micro-batch size kept in
    the meta, so the run goes on with the micro-batch it would have taken."""
    if not cfg.out_dir:
        return 0, {}
    from nanochat.checkpoint import check_model_config, latest_valid_checkpoint
    found = latest_valid_checkpoint(checkpoint_dir(cfg.out_dir), device)
    if found is None or found["meta"].get("stage") != "sft":
        return 0, {}
    check_model_config(found["path"], found["meta"]["model_config"], model.config.to_dict())
    model.load_state_dict(found["model"])
    for opt, opt_state in zip(optimizers, found.get("optim") or []):
        opt.load_state_dict(opt_state)
    return int(found["meta"]["step"]), dict(found["meta"])


# -----------------------------------------------------------------------------
# Training

def _all_reduce_sum(values: list[float], device: torch.device, ddp: bool) -> list[float]:
    if not ddp:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _step_micro_batches(plans: list, first: int, plan_accum: int, rank: int, B: int) -> list:
    """This rank's rows of one optimizer step (its plan_accum planned micro-batches, consecutive in the
    plan), cut into micro-batches of B rows. Rows are independent, so the step's gradient does not depend
    on B: after an out-of-memory fallback the same rows are rerun in smaller pieces, and a restart keeps
    the epoch plan it was made with. Consecutive, so that in the padding modes a rank's rows are the same
    whether the step was planned as 4 rows x 1 or 2 rows x 2 (a fallback equals a run configured small)."""
    rows = [row for k in range(plan_accum) for row in plans[first + rank * plan_accum + k]]
    return [rows[i:i + B] for i in range(0, len(rows), B)]


def train(cfg: SFTConfig, model: GPT, tokenizer: Tokenizer, train_examples: list[Example],
          val_examples: list[Example], device_batch_size: int, batch_size_source: str,
          should_stop: Callable[[], bool] | None = None, meta: dict | None = None,
          batch_info: dict | None = None, compiled: tuple | None = None) -> dict:
    """Fine-tune `model` in place and return the result row (a dict of RESULT_COLUMNS and extras).
    batch_info: resolve_batch_size's info (its cache_key and cache_dir receive an out-of-memory fallback).
    compiled: compile_sft(model) when the batch-size probe already stepped it (a compiled mode)."""
    started = time.time()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    ddp = world > 1
    device = model.get_device()
    batch_info = batch_info or {}
    # This mode's peak only: not the batch-size probe's largest (failed) trial, nor a benchmark's earlier mode.
    reset_peak_memory(device)
    T, B, mode = cfg.max_seq_len, device_batch_size, cfg.mode
    total = default_total_batch_size(cfg, world) if batch_size_source != "config" else cfg.total_batch_size
    accum = grad_accum_steps(total, B, T, world)
    rows_per_rank = B * accum
    pad_id = tokenizer.get_bos_token_id()
    if T > model.rotary_seq_len:
        raise ConfigError(f"sft.max_seq_len: {T} is longer than the model's rotary table ({model.rotary_seq_len})")

    optimizers = build_optimizers(model, unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr,
                                  matrix_lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * cfg.init_lr_frac
    optimizers[1].shard = cfg.overlap and ddp  # Muon: each rank orthogonalises its share of the matrices
    start_step, ckpt_meta = try_resume(cfg, model, optimizers, device) if cfg.save_checkpoint else (0, {})

    # The epoch plan is made with plan_B rows per planned micro-batch; B (the rows run at once) may
    # be smaller after an out-of-memory fallback. A restart plans as the interrupted attempt did
    # (its checkpoint says how) and keeps a fallback's smaller B, as train_loop does.
    plan_B = B
    saved_plan_B, saved_plan_accum = ckpt_meta.get("plan_batch_size"), ckpt_meta.get("plan_grad_accum")
    if _positive_int(saved_plan_B) and _positive_int(saved_plan_accum) and saved_plan_B * saved_plan_accum == rows_per_rank:
        plan_B = saved_plan_B
        kept = ckpt_meta.get("device_batch_size")
        if (ckpt_meta.get("batch_size_source") in OOM_FALLBACK_SOURCES and _positive_int(kept) and kept < B
                and rows_per_rank % kept == 0):
            B, batch_size_source = kept, source_after_oom(batch_size_source)
            accum = rows_per_rank // B
            print0(f"sft[{mode}] keeping the out-of-memory fallback of the interrupted run: "
                   f"device_batch_size={B}, grad_accum={accum}")
    plan_accum = rows_per_rank // plan_B

    # Plan every epoch up front: all ranks compute the same plan and take their share of each step, so
    # they agree on the number of steps without talking.
    lengths = [len(ids) - 1 for ids, _ in train_examples]
    plans = []
    for epoch in range(cfg.num_epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        epoch_plans = plan_batches([lengths[i] for i in order], mode, plan_B, T, cfg.pack_buffer)
        plans += [[[order[i] for i in row] for row in plan] for plan in epoch_plans]
    micro_per_step = plan_accum * world
    num_steps = len(plans) // micro_per_step
    if cfg.max_steps:
        num_steps = min(num_steps, cfg.max_steps)
    if num_steps < 1:
        raise ConfigError(f"sft: {len(train_examples)} conversations make {len(plans)} micro-batches, fewer than "
                          f"one optimizer step needs ({micro_per_step}); add data or lower device_batch_size")

    if mode.startswith("compile"):
        train_model, counter = compiled or compile_sft(model)
    else:
        train_model, counter = model, CompileCounter()
    compiled = mode.startswith("compile")
    model.train()
    oom = _oom_handlers()
    # gradients all-reduced in buckets during the last micro-batch's backward (train_loop does the same)
    grad_buckets = GradientBuckets(model) if (cfg.overlap and ddp) else None

    val_loss_before = evaluate(model, val_examples, cfg.eval_batch_size, T, pad_id) if start_step == 0 else None
    step = start_step
    state = "COMPLETED"
    losses: list[float] = []
    metrics_path = Path(cfg.out_dir) / "metrics.csv" if (cfg.out_dir and rank == 0) else None
    metrics = read_metrics(metrics_path, start_step) if metrics_path else []
    t_start = time.time()
    timed = dict(positions=0, real=0, supervised=0, conversations=0)
    warmup_s, timed_start, timed_steps = 0.0, None, 0
    # Each step's batches are built (and pinned on CUDA) one step ahead in a background thread
    # (dataloader.Prefetcher, as StepRows does for base training); overlap: false builds them in turn.
    pin = device.type == "cuda"

    def step_batches(k: int, rows: int) -> list:
        batches = [batch_for_mode(train_examples, m, mode, T, pad_id)
                   for m in _step_micro_batches(plans, k * micro_per_step, plan_accum, rank, rows)]
        return [b.pin_memory() for b in batches] if pin else batches

    upcoming = iter(range(start_step, num_steps))

    def next_step_batches():
        rows = B  # as it is now: the loop rebuilds a step prepared before an out-of-memory fallback
        return rows, step_batches(next(upcoming), rows)

    feed = Prefetcher(next_step_batches, num_steps - start_step, background=cfg.overlap)
    try:
        while step < num_steps:
            synchronize(device)
            t0 = time.time()
            built_with, batches = feed.next()
            if built_with != B:  # prepared before an out-of-memory fallback shrank the micro-batch
                batches = step_batches(step, B)
            # Count the step's supervised tokens over all micro-batches and ranks before any backward.
            n_sup = _all_reduce_sum([float(sum(b.num_supervised for b in batches))], device, ddp)[0]
            scale = world / max(n_sup, 1.0)  # gradients are averaged over ranks, so x world gives sum / n_sup
            while True:
                # stays on the device: no sync per micro-batch
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                out_of_memory = False
                try:
                    for i, b in enumerate(batches):
                        if grad_buckets is not None and i == len(batches) - 1:
                            grad_buckets.arm()
                        b = b.to(device)
                        with autocast_context(device):
                            loss = train_model(b.inputs, b.targets, doc_ids=b.doc_ids, loss_reduction="sum")
                        (loss * scale).backward()
                        loss_sum += loss.detach()
                except Exception as exc:  # only out-of-memory errors are handled; anything else re-raises
                    if oom is None or not oom[0](exc):
                        raise
                    out_of_memory = True
                loss = b = None
                if grad_buckets is not None:
                    grad_buckets.launch_rest()  # every rank's bucket collectives pair up, even after an OOM
                # Every rank learns whether any rank ran out of memory before anyone enters the gradient
                # all-reduce, so one rank's OOM cannot leave the others waiting there.
                out_of_memory = _any_rank(out_of_memory, ddp, device)
                if grad_buckets is not None:
                    grad_buckets.finish(apply=not out_of_memory)  # the averaged gradients, or dropped for the rerun
                if not out_of_memory:
                    break
                # Drop this step's partial gradients and rerun the same rows in smaller micro-batches
                # (at B=1 fallback_after_oom raises MemoryError, on every rank alike).
                zero_gradients(model, grad_buckets)
                B, accum = oom[1](B, accum, batch_info.get("cache_key"), batch_info.get("cache_dir"), device)
                batch_size_source = source_after_oom(batch_size_source)  # a configured batch stays the fixed side
                reset_peak_memory(device)   # the failed attempt filled the device: not the peak of the size kept
                print0(f"sft[{mode}] out of memory at step {step}: rerunning it with device_batch_size={B}, "
                       f"grad_accum={accum}")
                batches = step_batches(step, B)
            if grad_buckets is None:
                all_reduce_gradients(model)
            lr_mult = 1.0 - step / num_steps  # linear decay to zero, as nanochat's SFT
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * lr_mult
                opt.step()
            zero_gradients(model, grad_buckets)
            losses.append(_all_reduce_sum([float(loss_sum)], device, ddp)[0] / max(n_sup, 1.0))
            synchronize(device)
            dt = time.time() - t0
            step += 1
            if step - start_step <= cfg.warmup_steps:
                warmup_s += dt
                timed_start = time.time()
            else:
                timed_steps += 1
                for b in batches:
                    timed["positions"] += b.num_positions
                    timed["real"] += b.num_real
                    timed["supervised"] += b.num_supervised
                    timed["conversations"] += b.num_conversations
            if timed_start is None:
                timed_start = t0
            if metrics_path:
                positions = sum(b.num_positions for b in batches) * world
                metrics.append({"step": step, "loss": round(losses[-1], 6), "lrm": round(lr_mult, 6),
                                "tokens_per_s": round(positions / max(dt, 1e-9), 2),
                                "peak_memory_bytes": peak_memory_bytes(device),
                                "elapsed_s": round(time.time() - t_start, 3),
                                "num_steps": num_steps})
                if step % 10 == 0 or step == num_steps:
                    write_metrics(metrics_path, metrics)
            if step % 10 == 0 or step == num_steps:
                print0(f"sft[{mode}] step {step}/{num_steps} loss {losses[-1]:.4f} dt {dt * 1000:.0f}ms")
            # Ranks agree before acting on a stop request (USR2 may reach one rank only, or reach them at
            # different steps): a rank that left the loop alone would leave the others in the next all-reduce.
            if step < num_steps and _any_rank(bool(should_stop is not None and should_stop()), ddp, device):
                state = "PREEMPTED"
                if metrics_path:
                    write_metrics(metrics_path, metrics)
                break
    finally:
        feed.close()  # the prefetch thread never outlives the loop (end, preemption or error)
    if grad_buckets is not None:
        grad_buckets.remove()
    synchronize(device)
    timed_s = time.time() - timed_start if timed_steps else 0.0

    # Saved before evaluation: on preemption the grace period goes to the checkpoint, and an eval
    # crash never costs the trained weights. A preempted run is evaluated when it resumes and ends.
    ckpt_path = None
    if cfg.save_checkpoint and cfg.out_dir and rank == 0:
        tokenizer_dir = (meta or {}).get("tokenizer_dir") or str(Path(cfg.out_dir) / "tokenizer")
        if not (Path(tokenizer_dir) / "tokenizer.json").exists():
            tokenizer.save(tokenizer_dir)
        batch_meta = dict(device_batch_size=B, grad_accum_steps=accum, batch_size_source=batch_size_source,
                          plan_batch_size=plan_B, plan_grad_accum=plan_accum)
        ckpt_path = str(save_sft_checkpoint(cfg, model, tokenizer_dir, optimizers, step, dict(meta or {}, **batch_meta)))
    if ddp:
        dist.barrier()
    model.eval()
    val_loss = evaluate(model, val_examples, cfg.eval_batch_size, T, pad_id) if state == "COMPLETED" else None

    counts = _all_reduce_sum([timed["positions"], timed["real"], timed["supervised"], timed["conversations"]], device, ddp)
    positions, real, supervised, conversations = counts
    rate = (lambda x: x / timed_s) if timed_s > 0 else (lambda x: None)
    tokens_per_s = rate(positions)
    mean_step_s = timed_s / timed_steps if timed_steps else None
    # What the warm-up cost beyond ordinary steps: compilation, mostly (the whole warm-up if nothing was timed).
    compile_s = 0.0
    if compiled:
        compile_s = max(0.0, warmup_s - cfg.warmup_steps * mean_step_s) if mean_step_s else warmup_s
    peaks = device_peaks(device, cfg.peak_flops)
    peak = peaks["peak_flops"]
    mfu = None
    if peak and tokens_per_s:
        mfu = 100 * model.estimate_flops() * tokens_per_s / (peak * world)
    return {
        "kind": "sft", "variant": mode, "state": state,
        "device_name": device_name(device), "world_size": world,
        "depth": model.config.n_layer, "n_params": model.num_params(), "seq_len": T,
        "device_batch_size": B, "batch_size_source": batch_size_source,
        "total_batch_size": B * T * world * accum, "grad_accum_steps": accum, "steps": step - start_step,
        "tokens_per_s": tokens_per_s, "real_tokens_per_s": rate(real), "supervised_tokens_per_s": rate(supervised),
        "padding_fraction": (1 - real / positions) if positions else None,
        "mfu": mfu, "peak_memory_bytes": peak_memory_bytes(device),
        "peak_flops": peak, "peak_flops_source": peaks["peak_flops_source"],
        "compile": compiled, "num_compiles": counter.count if compiled else 0,
        "final_loss": losses[-1] if losses else None,
        "wall_time_s": time.time() - started, "git_commit": git_commit(),
        "extra": {
            "val_loss": val_loss, "val_loss_before": val_loss_before,
            "first_loss": losses[0] if losses else None,
            "warmup_seconds": warmup_s,
            "compile_seconds": compile_s,
            "timed_seconds": timed_s, "timed_steps": timed_steps,
            "conversations_per_s": rate(conversations),
            "attention": (ATTENTION_NAMES[doc_attention_route(model.doc_attention, device)]
                          if mode in PACKED_MODES else "sdpa-causal"),
            "num_steps_planned": num_steps, "resumed_from_step": start_step,
            "checkpoint": ckpt_path,
        },
    }


def prepare(cfg: SFTConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict, list[Example], list[Example]]:
    """Load the conversations, the model and tokenizer, and render train/val examples."""
    if cfg.data_path:
        conversations, source = load_conversations(cfg.data_path, cfg.base_dir, cfg.seed), cfg.data_path
    else:
        conversations, source = synthetic_conversations(cfg.num_conversations, cfg.seed, cfg.max_seq_len), "synthetic"
    model, tokenizer, meta = load_or_build(cfg, conversations, device)
    examples = render_examples(conversations, tokenizer, cfg.max_seq_len, source)
    n_val = min(cfg.val_conversations, len(examples) // 2)
    train_examples, val_examples = examples[:len(examples) - n_val], examples[len(examples) - n_val:]
    return model, tokenizer, meta, train_examples, val_examples


def run(cfg: SFTConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    """The SFT stage: one result row, with the mode as its variant. Writes out_dir/checkpoints."""
    cfg.validate()
    info = compute_init(cfg.device_type or None, seed=cfg.seed)
    model, tokenizer, meta, train_examples, val_examples = prepare(cfg, info.device)
    compiled = compile_sft(model) if probe_compiles(cfg, info.device) else None
    dbs, source, bs_info = resolve_batch_size(cfg, model, info.world_size, info.device,
                                              compiled[0] if compiled else None)
    row = train(cfg, model, tokenizer, train_examples, val_examples, dbs, source, should_stop, meta, bs_info,
                compiled)
    row["extra"]["batch_size_info"] = bs_info
    if cfg.out_dir and info.is_master:
        atomic_write_json(Path(cfg.out_dir) / "sft_result.json", row)
    return row


# -----------------------------------------------------------------------------
# Benchmark: the modes on the same conversations, model init and batch size

ORIGINAL_BATCH_SIZE = 4  # the original SFT's conversations per batch (eager-dynamic's size when the bench's is automatic)


def bench(cfg: SFTConfig, modes: tuple[str, ...] = MODES) -> list[dict]:
    """One row per mode. Every mode starts from the same weights (re-initialised or reloaded) and sees the
    same conversations, at the same device batch size (eager-dynamic at ORIGINAL_BATCH_SIZE when that
    size is automatic); checkpoints are not written. Compare real_tokens_per_s (BENCH_RATIOS)."""
    cfg.validate()
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"bench sft: unknown mode {mode!r} (choose from {', '.join(MODES)})")
    info = compute_init(cfg.device_type or None, seed=cfg.seed)
    model, tokenizer, meta, train_examples, val_examples = prepare(cfg, info.device)
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dbs, source, _ = resolve_batch_size(cfg, model, info.world_size, info.device)
    rows = []
    for mode in modes:
        model.load_state_dict(initial_state)
        mode_cfg = replace(cfg, mode=mode, save_checkpoint=False)
        mode_dbs, mode_source = dbs, source
        if mode == "eager-dynamic" and cfg.device_batch_size == 0:
            # the original as it was: eager, padded to the longest, ORIGINAL_BATCH_SIZE conversations a batch
            mode_dbs, mode_source = ORIGINAL_BATCH_SIZE, "config"
            mode_cfg = replace(mode_cfg, device_batch_size=ORIGINAL_BATCH_SIZE, total_batch_size=0)
        rows.append(train(mode_cfg, model, tokenizer, train_examples, val_examples, mode_dbs, mode_source, None, meta))
    return rows


# The three ratios of real tokens/s that attribute SFT's gain: (name, numerator mode, denominator mode)
BENCH_RATIOS = (
    ("compile-pack/compile-pad", "compile-pack", "compile-pad"),      # packing, both compiled
    ("compile-pack/eager-pack", "compile-pack", "eager-pack"),        # compiling, both packed
    ("compile-pack/eager-dynamic", "compile-pack", "eager-dynamic"),  # everything vs the original
)


def bench_ratios(rows: list[dict]) -> dict:
    """BENCH_RATIOS on real tokens/s, for the pairs whose modes both ran."""
    real = {r["variant"]: r["real_tokens_per_s"] for r in rows}
    return {name: real[a] / real[b] for name, a, b in BENCH_RATIOS if real.get(a) and real.get(b)}
