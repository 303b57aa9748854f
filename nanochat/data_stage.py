"""
The `data` stage: make a run's datasets present and verified in the shared work directory before
any training stage needs them (run it where the network is: the login node, or a partition that
reaches the hub; training stages then read the same files with the hub offline).

    from nanochat.data_stage import DataConfig, run
    run(DataConfig(pretraining="fineweb-edu-100b", num_shards=240, conversations=["smoltalk", "mmlu", "gsm8k"],
                   vocab_size=65536))

- pretraining shards of a hub set (nanochat.fetch.PRETRAINING_SETS) into <base_dir>/data/<set>/;
- conversation sets (nanochat.datasets_chat.CHAT_SETS) converted once into <base_dir>/data/chat/<set>.jsonl;
- the tokenizer trained once on the shards (nanochat trains on ~2B characters), shared by every stage.
Everything is idempotent: with all files present it does no network work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nanochat.common import ConfigError, get_base_dir


@dataclass
class DataConfig:
    pretraining: str = ""            # a pretraining set (fineweb-edu-100b, climbmix-400b); "" = none
    num_shards: int = 0              # shards incl. the validation shard; 0 = what the training stages need (jobs fill it at submit)
    conversations: list[str] = field(default_factory=list)   # smoltalk, mmlu, gsm8k
    vocab_size: int = 0              # train the tokenizer on the shards (0 = no tokenizer)
    tokenizer_max_chars: int = 2_000_000_000   # nanochat trains its tokenizer on ~2B characters
    workers: int = 8                 # parallel downloads
    retries: int = 5                 # attempts per file (exponential backoff from backoff_s)
    backoff_s: float = 2.0
    revision: str = "main"           # hub revision (a branch, tag or commit) of every set
    base_dir: str = ""
    out_dir: str = ""


def run(cfg: DataConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    from nanochat.datasets_chat import ensure_chat_set
    from nanochat.fetch import fetch_files, pretraining_dir, pretraining_set, shard_files
    from nanochat.prepare import ensure_tokenizer
    t0 = time.perf_counter()
    base_dir = Path(cfg.base_dir or get_base_dir())
    if not cfg.pretraining and not cfg.conversations:
        raise ConfigError("data.pretraining/conversations: nothing to fetch (name a pretraining set or conversation sets)")
    result: dict = {"state": "COMPLETED", "files": 0, "fetched": 0, "bytes_fetched": 0}
    if cfg.pretraining:
        ds = pretraining_set(cfg.pretraining)
        if cfg.num_shards <= 0:
            raise ConfigError(f"data.num_shards={cfg.num_shards}: give the number of shards (submit computes it "
                              "from the training stages when the pipeline has them)")
        s = fetch_files(ds.repo_id, shard_files(ds, cfg.num_shards), pretraining_dir(base_dir, ds.name),
                        cfg.revision, cfg.workers, cfg.retries, cfg.backoff_s)
        print(f"[data] {ds.name}: {s['files']} shards in {s['dest']} ({s['fetched']} fetched, {s['present']} present)",
              flush=True)
        result.update(files=s["files"], fetched=s["fetched"], bytes_fetched=s["bytes"],
                      data_path=s["dest"], num_shards=cfg.num_shards)
        if cfg.vocab_size:
            tok = ensure_tokenizer(base_dir, cfg.vocab_size, pretraining_dir(base_dir, ds.name), cfg.tokenizer_max_chars)
            result["vocab_size"] = tok.get_vocab_size()
    elif cfg.vocab_size:
        raise ConfigError("data.vocab_size: the tokenizer is trained on pretraining shards; set data.pretraining")
    convs = {}
    for name in cfg.conversations:
        info = ensure_chat_set(base_dir, name, workers=cfg.workers, retries=cfg.retries, backoff_s=cfg.backoff_s)
        convs[name] = info["conversations"]
    if convs:
        result["conversations"] = convs
    result["wall_time_s"] = time.perf_counter() - t0
    return result
