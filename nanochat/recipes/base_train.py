"""
Base (pre)training: a GPT of a given depth on the pretraining shards.
    from nanochat.recipes.base_train import BaseTrainConfig, run
    row = run(BaseTrainConfig(depth=4, num_steps=100, device_batch_size=8, out_dir="runs/base"))
Data and tokenizer are prepared on first use (nanochat.prepare, idempotent and file-locked).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

from nanochat.distributed import compute_cleanup, compute_init
from nanochat.files import get_base_dir
from nanochat.dataloader import pretraining_loader
from nanochat.dataset import chars_per_token, data_epochs_guard, shard_text_bytes, split_shards
from nanochat.gpt import GPTConfig, build_model
from nanochat.prepare import ensure_pretraining_data, ensure_tokenizer, tokenizer_dir
from nanochat.training.config import TrainConfig
from nanochat.training.geometry import known_total
from nanochat.training.train_loop import train


@dataclass
class BaseTrainConfig(TrainConfig):
    kind: ClassVar[str] = "base_train"
    depth: int = 4                     # layers; width = 64 * depth
    vocab_size: int = 4096             # tokenizer size (trained on first use)
    data_source: str = ""              # "" = text shipped with Python; a fetched hub set (fineweb-edu-100b, climbmix-400b); or a folder of shards / .txt / .jsonl
    num_shards: int = 4                # shards written when preparing data (last = validation)
    data_max_chars: int = 4_000_000    # size of the default corpus (Python's own text) in characters
    max_data_epochs: float = 16.0      # refuse to train for more passes over the data than this (0 = no limit)


def run(cfg: BaseTrainConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    if cfg.depth <= 0:
        raise cfg.problem("depth", "must be positive")
    base_dir = Path(cfg.base_dir or get_base_dir())
    dist_info = compute_init(cfg.device_type or None, seed=cfg.seed)
    try:
        data_path = ensure_pretraining_data(base_dir, cfg.data_source, cfg.num_shards, cfg.data_max_chars)
        tokenizer = ensure_tokenizer(base_dir, cfg.vocab_size, data_path)
        train_shards, val_shard = split_shards(data_path)
        model = build_model(GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.seq_len), dist_info.device)
        epochs = _data_epochs(cfg, model.num_params(), dist_info.world_size, data_path, train_shards, val_shard, tokenizer)

        def make_train_loader(rank, world_size, num_streams):
            return pretraining_loader(train_shards, tokenizer, cfg.seq_len, rank, world_size, num_streams)

        def make_val_loader(rank, world_size, num_streams):
            return pretraining_loader([val_shard], tokenizer, cfg.seq_len, rank, world_size, num_streams)

        result = train(cfg, stage="base_train", model=model, tokenizer=tokenizer,
                       tokenizer_dir=str(tokenizer_dir(base_dir, cfg.vocab_size, data_path)), dist_info=dist_info,
                       make_train_loader=make_train_loader, make_val_loader=make_val_loader,
                       should_stop=should_stop, extra_meta={"data_path": str(data_path)})
    finally:
        compute_cleanup()
    return {"depth": cfg.depth, **result, **({"data_epochs": round(epochs, 4)} if epochs is not None else {})}


def _data_epochs(cfg: BaseTrainConfig, n_params: int, world_size: int, data_path, train_shards, val_shard,
                 tokenizer) -> float | None:
    """Passes over the training shards this run will make (the guard of nanochat.dataset), when the
    tokens per step are known before the batch size is (total_batch_size, or a fixed device batch)."""
    total = known_total(cfg.total_batch_size, cfg.device_batch_size, cfg.seq_len, world_size)
    if total <= 0:
        return None
    steps = cfg.num_steps or max(1, int(cfg.target_param_data_ratio * n_params // total))
    data_tokens = sum(shard_text_bytes(s) for s in train_shards) / chars_per_token(tokenizer, val_shard)
    stage = Path(cfg.out_dir).name if cfg.out_dir else "base_train"
    return data_epochs_guard(stage, data_path, steps * total, data_tokens, cfg.max_data_epochs)


if __name__ == "__main__":
    import argparse
    import json
    from dataclasses import fields
    p = argparse.ArgumentParser(description="base training (nanochat recipe)")
    for f in fields(BaseTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    print(json.dumps(run(BaseTrainConfig(**vars(p.parse_args()))), default=str))
