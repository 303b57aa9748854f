"""
The `data` stage: make every dataset a run reads present and verified in the shared work directory
before any stage needs it (run it where the network is: the login node, or a partition that
reaches the hub; every other stage then reads the same files with the hub offline).

    from nanochat.recipes.data import DataConfig, run
    run(DataConfig(pretraining="climbmix-400b", num_shards=170, conversations=["smoltalk", "mmlu", "gsm8k"],
                   evals=["core", "arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval"], vocab_size=65536))

- pretraining shards of a hub set (nanochat.fetch.PRETRAINING_SETS) into <base_dir>/data/<set>/;
- conversation sets (nanochat.datasets_chat.CHAT_SETS) converted once into <base_dir>/data/chat/<set>.jsonl;
- evaluation sets (nanochat.eval_data.EVAL_SETS: the CORE bundle and the chat tasks' test splits)
  into <base_dir>/eval_data/;
- the tokenizer trained once on the shards (nanochat trains on ~2B characters), shared by every stage.
Everything is idempotent: with all files present it does no network work. The result row's `sets`
is the fetch table: per set its source, commit, files, bytes fetched and files already present.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nanochat.errors import ConfigError
from nanochat.files import get_base_dir


@dataclass
class DataConfig:
    pretraining: str = ""            # a pretraining set (climbmix-400b, fineweb-edu-100b); "" = none
    num_shards: int = 0              # shards incl. the validation shard; 0 = what the training stages need (jobs fill it at submit)
    conversations: list[str] = field(default_factory=list)   # smoltalk, mmlu, gsm8k
    evals: list[str] = field(default_factory=list)           # core, arc_easy, arc_challenge, mmlu, gsm8k, humaneval
    vocab_size: int = 0              # train the tokenizer on the shards (0 = no tokenizer; no shards: no tokenizer)
    tokenizer_max_chars: int = 2_000_000_000   # nanochat trains its tokenizer on ~2B characters
    workers: int = 8                 # parallel downloads
    retries: int = 5                 # attempts per file (exponential backoff from backoff_s)
    backoff_s: float = 2.0
    revision: str = ""               # the pretraining set's revision; "" = its pinned one (a branch: at 1st fetch)
    eval_bundle_url: str = ""        # "" = nanochat's eval_bundle.zip (nanochat.eval_data.EVAL_BUNDLE_URL)
    eval_bundle_sha256: str = ""     # "" = the pinned checksum of nanochat's bundle; required with another URL
    base_dir: str = ""
    out_dir: str = ""

    @staticmethod
    def check_args(args: dict) -> list[tuple[str, str]]:
        """(key, problem) for values the stage would refuse; the pipeline spec calls it before submitting."""
        from nanochat.datasets_chat import CHAT_SETS
        from nanochat.eval_data import EVAL_SETS
        from nanochat.fetch import PRETRAINING_SETS
        problems = []
        pre = args.get("pretraining", "")
        if pre and pre not in PRETRAINING_SETS:
            problems.append(("pretraining", f"unknown set {pre!r}; known: {', '.join(PRETRAINING_SETS)}"))
        for key, known in (("conversations", CHAT_SETS), ("evals", EVAL_SETS)):
            unknown = [x for x in args.get(key) or [] if x not in known]
            if unknown:
                problems.append((key, f"unknown set {unknown[0]!r}; known: {', '.join(known)}"))
        if not pre and not args.get("conversations") and not args.get("evals"):
            problems.append(("pretraining", "nothing to fetch: name a pretraining set, conversations or evals"))
        if args.get("eval_bundle_url") and not args.get("eval_bundle_sha256"):
            problems.append(("eval_bundle_sha256", "a bundle from another URL needs its own sha256 (the pinned one "
                                                   "is nanochat's file's)"))
        return problems


def run(cfg: DataConfig, should_stop: Callable[[], bool] | None = None) -> dict:
    from nanochat.datasets_chat import ensure_chat_set
    from nanochat.eval_data import ensure_eval_set
    from nanochat.fetch import fetch_files, pretraining_dir, pretraining_set, shard_files
    from nanochat.prepare import ensure_tokenizer
    for key, message in DataConfig.check_args(vars(cfg)):
        raise ConfigError(f"data.{key}: {message}")
    t0 = time.perf_counter()
    base_dir = Path(cfg.base_dir or get_base_dir())
    result: dict = {"state": "COMPLETED", "files": 0, "fetched": 0, "bytes_fetched": 0}
    sets: list[dict] = []

    def record(name: str, kind: str, summary: dict, **extra):
        sets.append({"set": name, "kind": kind, "source": summary["repo_id"], "revision": summary.get("revision"),
                     "files": summary["files"], "fetched": summary["fetched"], "present": summary["present"],
                     "bytes": summary["bytes"], **extra})

    if cfg.pretraining:
        ds = pretraining_set(cfg.pretraining)
        if cfg.num_shards <= 0:
            raise ConfigError(f"data.num_shards={cfg.num_shards}: give the number of shards (submit computes it "
                              "from the training stages when the pipeline has them)")
        s = fetch_files(ds.repo_id, shard_files(ds, cfg.num_shards), pretraining_dir(base_dir, ds.name),
                        cfg.revision or ds.revision, cfg.workers, cfg.retries, cfg.backoff_s)
        print(f"[data] {ds.name}: {s['files']} shards in {s['dest']} ({s['fetched']} fetched, {s['present']} present)",
              flush=True)
        record(ds.name, "pretraining", s)
        result.update(data_path=s["dest"], num_shards=cfg.num_shards)
        if cfg.vocab_size:
            tok = ensure_tokenizer(base_dir, cfg.vocab_size, pretraining_dir(base_dir, ds.name), cfg.tokenizer_max_chars)
            result["vocab_size"] = tok.get_vocab_size()
    convs = {}
    for name in cfg.conversations:
        info = ensure_chat_set(base_dir, name, workers=cfg.workers, retries=cfg.retries, backoff_s=cfg.backoff_s)
        convs[name] = info["conversations"]
        record(name, "conversations", info["fetch"], rows=info["conversations"])
    if convs:
        result["conversations"] = convs
    for name in cfg.evals:
        info = ensure_eval_set(base_dir, name, cfg.eval_bundle_url, cfg.eval_bundle_sha256, workers=cfg.workers,
                               retries=cfg.retries, backoff_s=cfg.backoff_s)
        record(name, "evals", info["fetch"],
               **({"rows": info["rows"]} if "rows" in info else {"files_unpacked": info["files"]}))
    result.update(files=sum(s["files"] for s in sets), fetched=sum(s["fetched"] for s in sets),
                  bytes_fetched=sum(s["bytes"] for s in sets), sets=sets)
    print(format_fetch_table(sets), flush=True)
    result["wall_time_s"] = time.perf_counter() - t0
    return result


def format_fetch_table(sets: list[dict]) -> str:
    """The data stage's fetch table: one line per set."""
    def size(b):
        return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"
    lines = [f"{'set':<14} {'kind':<13} {'source':<44} {'revision':<14} {'files':>5} {'fetched':>7} "
             f"{'present':>7} {'fetched size':>12}"]
    for s in sets:
        lines.append(f"{s['set']:<14} {s['kind']:<13} {str(s['source'])[:44]:<44} {str(s['revision'] or '')[:14]:<14} "
                     f"{s['files']:>5} {s['fetched']:>7} {s['present']:>7} {size(s['bytes']):>12}")
    return "\n".join(lines)
