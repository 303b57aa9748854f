"""
Mid-training: continue a base checkpoint on conversations (the chat format, tool use), as
nanochat does: conversations rendered with tokenizer.render_conversation, loss only where the
mask is 1 (assistant text and tool calls), concatenated into a stream of fixed (B, T) rows.
Data: a JSONL/parquet of {"messages": [...]} (data_path) mixed with the offline synthetic tasks
of nanochat.synthetic (num_synthetic of them); "" data_path -> synthetic only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from nanochat.checkpoint import load_model
from nanochat.distributed import compute_cleanup, compute_init
from nanochat.errors import ConfigError
from nanochat.files import get_base_dir
from nanochat.dataloader import conversation_loader
from nanochat.datasets_chat import read_mixture
from nanochat.synthetic import generate_conversations
from nanochat.training.config import TrainConfig
from nanochat.training.geometry import known_total
from nanochat.training.train_loop import train


@dataclass
class MidTrainConfig(TrainConfig):
    kind: ClassVar[str] = "mid_train"
    data_path: str = ""                # JSONL/parquet of conversations, or a mixture: smoltalk+mmlu+gsm8k; "" = synthetic only
    num_synthetic: int = 4000          # synthetic conversations mixed in (0: none)
    val_fraction: float = 0.05         # share of conversations held out for val bpb
    num_steps: int = 200               # mid-training is short; 0 = one pass (param/data ratio rule)
    max_data_epochs: float = 16.0      # refuse to train for more passes over the conversations than this (0 = no limit)
    embedding_lr: float = 0.2
    matrix_lr: float = 0.02
    unembedding_lr: float = 0.004


def load_mixture(cfg: MidTrainConfig, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(train, val) conversations: the user's file plus synthetic ones, shuffled with the seed."""
    convs: list[dict] = []
    if cfg.data_path:
        convs += read_mixture(cfg.data_path, cfg.base_dir or get_base_dir(), cfg.seed)   # files and/or fetched sets
    if cfg.num_synthetic:
        convs += generate_conversations(cfg.num_synthetic, seed=cfg.seed, max_tokens=max_tokens)
    if len(convs) < 4:
        raise ConfigError(f"mid_train.data_path/num_synthetic: {len(convs)} conversations is too few")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"mid_train.val_fraction={cfg.val_fraction}: must be in (0, 1)")
    random.Random(cfg.seed).shuffle(convs)
    n_val = max(2, int(len(convs) * cfg.val_fraction))
    return convs[n_val:], convs[:n_val]


def run(cfg: MidTrainConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    if not cfg.init_from:
        raise ConfigError("mid_train.init_from: a base checkpoint folder is required")
    dist_info = compute_init(cfg.device_type or None, seed=cfg.seed)
    try:
        model, tokenizer, meta = load_model(cfg.init_from, dist_info.device)
        if cfg.seq_len > model.config.sequence_len:
            # the rotary table covers 10x the base length, but keep to what the model was trained on
            raise ConfigError(f"mid_train.seq_len={cfg.seq_len} is longer than the base model's "
                              f"{model.config.sequence_len} ({meta['path']})")
        train_convs, val_convs = load_mixture(cfg, max_tokens=cfg.seq_len * 4)
        epochs = _data_epochs(cfg, dist_info.world_size, train_convs, tokenizer)

        def make_train_loader(rank, world_size, num_streams):
            return conversation_loader(train_convs, tokenizer, cfg.seq_len, rank, world_size, num_streams, seed=cfg.seed)

        def make_val_loader(rank, world_size, num_streams):
            return conversation_loader(val_convs, tokenizer, cfg.seq_len, rank, world_size, num_streams, seed=cfg.seed)

        result = train(cfg, stage="mid_train", model=model, tokenizer=tokenizer,
                       tokenizer_dir=meta["tokenizer_dir"], dist_info=dist_info,
                       make_train_loader=make_train_loader, make_val_loader=make_val_loader,
                       should_stop=should_stop, extra_meta={"init_from": meta["path"]})
    finally:
        compute_cleanup()
    return {"depth": model.config.n_layer, **result, **({} if epochs is None else {"data_epochs": round(epochs, 4)})}


def _data_epochs(cfg: MidTrainConfig, world_size: int, convs: list[dict], tokenizer) -> float | None:
    """Passes over the training conversations this run will make (nanochat.dataset's guard, as for
    pretraining), when the steps and the tokens per step are known before the batch size is."""
    from nanochat.datasets_chat import conversation_chars
    from nanochat.dataset import data_epochs_guard
    total = known_total(cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, world_size)
    if total <= 0 or cfg.num_steps <= 0:
        return None
    chars = sum(conversation_chars(c) for c in convs)
    sample = convs[:200]    # the tokenizer's compression on these conversations, as base_train measures it on a shard
    sample_chars = sum(conversation_chars(c) for c in sample)
    sample_tokens = sum(len(tokenizer.render_conversation(c, max_tokens=1 << 30)[0]) for c in sample)
    data_tokens = chars * sample_tokens / sample_chars if sample_chars else 0.0
    stage = Path(cfg.out_dir).name if cfg.out_dir else "mid_train"
    return data_epochs_guard(stage, cfg.data_path or "(synthetic conversations)", cfg.num_steps * total, data_tokens,
                             cfg.max_data_epochs)
