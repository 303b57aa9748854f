"""
Chat SFT: fine-tune on conversations, loss on the assistant's tokens only.

Four ways to batch (SFTConfig.mode), so the cost of each can be measured side by side:
- "eager-dynamic": pad each batch to its longest conversation, no compile (the original baseline).
- "compile-pad":   pad every row to seq_len, torch.compile(dynamic=False): one shape, much padding.
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

The training loop itself is nanochat.training.sft_loop (the machinery base and mid training share);
this module is the stage: its config, its conversations, the model it fine-tunes, run and bench.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch

from nanochat.distributed import compute_init
from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, get_base_dir
from nanochat.datasets_chat import read_mixture
from nanochat.gpt import GPT, GPTConfig, build_model
from nanochat.packing import MODES, Example, truncate
from nanochat.synthetic import generate_conversations
from nanochat.tokenizer import Tokenizer
from nanochat.training.config import TrainingConfig
from nanochat.training.routes import compile_sft
from nanochat.training.sft_loop import probe_compiles, resolve_batch_size, train


@dataclass
class SFTConfig(TrainingConfig):
    """The SFT stage. The fields it shares with base and mid training (base_dir, out_dir, init_from,
    device_type, seq_len, device_batch_size, total_batch_size, the learning rates, weight_decay, seed,
    overlap, peak_flops) are TrainingConfig's; init_from "" = a fresh model (benchmarks, tests)."""
    kind: ClassVar[str] = "sft"
    renamed_keys: ClassVar[dict[str, str]] = {"max_seq_len": "seq_len"}
    seq_len: int = 1024         # T: tokens per row; longer conversations are truncated
    seed: int = 0
    # what to run
    mode: str = "compile-pack"  # eager-dynamic | eager-pack | compile-pad | compile-pack
    data_path: str = ""         # JSONL or parquet of {"messages": [...]}; "" = the offline synthetic set
    num_conversations: int = 2000   # size of the synthetic set when data_path is ""
    val_conversations: int = 64     # held out (taken from the end of the data) for the validation loss
    num_epochs: int = 1
    max_steps: int = 0          # a cap on the optimizer steps the epochs make (0 = no cap), not a step count
    pack_buffer: int = 512      # conversations considered at once by best-fit packing
    warmup_steps: int = 1       # optimizer steps left out of the timed window (compilation happens here)
    # a fresh model when init_from is "" (its tokenizer is trained on the conversations)
    depth: int = 4
    vocab_size: int = 2048
    # optimization (nanochat's SFT: base learning rates x init_lr_frac, decaying linearly to zero)
    init_lr_frac: float = 0.02
    eval_batch_size: int = 8
    save_checkpoint: bool = True

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise self.problem("mode", f"unknown mode (choose one of {', '.join(MODES)})")
        for key in ("num_epochs", "eval_batch_size", "pack_buffer", "depth"):
            if getattr(self, key) < 1:
                raise self.problem(key, "must be at least 1")
        for key in ("max_steps", "warmup_steps", "val_conversations"):
            if getattr(self, key) < 0:
                raise self.problem(key, "must be >= 0")
        if not self.data_path and self.num_conversations < 2:
            raise self.problem("num_conversations", "need at least 2")
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


def render_examples(conversations: list[dict], tokenizer: Tokenizer, seq_len: int, source: str) -> list[Example]:
    examples = []
    for i, conv in enumerate(conversations):
        try:
            ids, mask = tokenizer.render_conversation(conv, max_tokens=seq_len + 1)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: conversation {i}: {e}") from None
        examples.append(truncate((ids, mask), seq_len))
    return examples


# -----------------------------------------------------------------------------
# Model and tokenizer

def fresh_model(cfg: SFTConfig, tokenizer: Tokenizer, device: torch.device) -> GPT:
    torch.manual_seed(cfg.seed)
    config = GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.seq_len)
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


def prepare(cfg: SFTConfig, device: torch.device) -> tuple[GPT, Tokenizer, dict, list[Example], list[Example]]:
    """Load the conversations, the model and tokenizer, and render train/val examples."""
    if cfg.data_path:
        conversations, source = load_conversations(cfg.data_path, cfg.base_dir, cfg.seed), cfg.data_path
    else:
        conversations, source = synthetic_conversations(cfg.num_conversations, cfg.seed, cfg.seq_len), "synthetic"
    model, tokenizer, meta = load_or_build(cfg, conversations, device)
    examples = render_examples(conversations, tokenizer, cfg.seq_len, source)
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

# the original SFT's conversations per batch (eager-dynamic's size when the bench's is automatic)
ORIGINAL_BATCH_SIZE = 4


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
