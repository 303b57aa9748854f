"""
The data plan of a pipeline (no network): what each stage will read, where it comes from, how many
pretraining shards a data stage fetches, and the epochs each training stage makes over its data.

check_pipeline_data (called by `submit` before anything is submitted) fills a data stage's
num_shards from the training stages' token budgets, refuses (exit 2) a stage that will read data
(pretraining shards, a mixture's sets, evaluation sets) that is neither in the work directory nor
fetched by a data stage it depends on, warns when a stage will make more than one epoch over its
data, and refuses past the stage's max_data_epochs. `python -m jobs data plan` prints it
(format_plan; the command is jobs/commands/data.py).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.files import get_base_dir

PRETRAIN_KINDS = ("base_train",)


# -----------------------------------------------------------------------------
# Planning (no network): what each stage needs and what its data holds

def stage_config(stage):
    """The stage's recipe config from its args alone (no run: the jobs-filled fields stay empty)."""
    from jobs.spec import config_class
    cls = config_class(stage.kind)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in stage.args.items() if k in names})


def _world_size(stage) -> int:
    return stage.resources.nodes * stage.resources.tasks_per_node


def training_tokens(stage) -> tuple[float | None, str]:
    """(tokens the stage trains on, how it was computed), or (None, why not) when the tokens per step
    are only known once the batch size is probed."""
    import torch
    from nanochat.gpt import GPT, GPTConfig
    cfg = stage_config(stage)
    total = cfg.total_batch_size or (cfg.device_batch_size * cfg.seq_len * _world_size(stage)
                                     if cfg.device_batch_size > 0 else 0)
    if total <= 0:
        return None, "tokens per step unknown until the probe (set total_batch_size)"
    if cfg.num_steps:
        return float(cfg.num_steps * total), f"{cfg.num_steps} steps x {total:,} tokens"
    with torch.device("meta"):
        n_params = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, cfg.seq_len)).num_params()
    steps = max(1, int(cfg.target_param_data_ratio * n_params // total))
    return float(steps * total), f"{cfg.target_param_data_ratio:g} x {n_params / 1e6:,.0f}M params = {steps:,} steps x {total:,}"


def _data_stage_for(pipeline, set_name: str):
    for s in pipeline.stages.values():
        if s.kind == "data" and s.args.get("pretraining") == set_name:
            return s
    return None


def pretraining_data(pipeline, stage, base_dir: Path) -> dict:
    """What a pretraining stage's data holds: {"source", "dir", "shards", "chars", "tokens", "how"}."""
    from nanochat import fetch, prepare
    from nanochat.dataset import SHARD_GLOB, shard_text_bytes
    cfg = stage_config(stage)
    src = cfg.data_source
    if src in fetch.PRETRAINING_SETS:
        ds = fetch.PRETRAINING_SETS[src]
        dest = fetch.pretraining_dir(base_dir, src)
        data_stage = _data_stage_for(pipeline, src)
        shards = int(data_stage.args.get("num_shards") or 0) if data_stage else 0
        how = f"fetched by stage {data_stage.name}" if data_stage else "already fetched"
        if not data_stage:
            shards = len(fetch.read_manifest(dest).get("files", {}))
        chars = max(shards - 1, 0) * ds.chars_per_shard
        return {"source": src, "dir": str(dest), "shards": shards, "chars": chars,
                "bytes": shards * ds.bytes_per_shard, "how": how}
    if not src:
        dest = prepare.data_dir(base_dir, "", cfg.num_shards, cfg.data_max_chars)
        done = dest / prepare.DONE_FILE
        total = json.loads(done.read_text()).get("num_chars", cfg.data_max_chars) if done.is_file() else cfg.data_max_chars
        chars = total * (cfg.num_shards - 1) / cfg.num_shards
        return {"source": "python-stdlib (offline)", "dir": str(dest), "shards": cfg.num_shards, "chars": chars,
                "bytes": total, "how": "text shipped with Python"}
    path = Path(src)
    shards = sorted(path.glob(SHARD_GLOB)) if path.is_dir() else []
    if len(shards) >= 2:
        chars = sum(shard_text_bytes(s) for s in shards[:-1])
        return {"source": src, "dir": str(path), "shards": len(shards), "chars": chars,
                "bytes": sum(s.stat().st_size for s in shards), "how": "shards in place"}
    files = [p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()] if path.is_dir() else []
    total = sum(p.stat().st_size for p in files)
    return {"source": src, "dir": str(path), "shards": cfg.num_shards, "chars": total * (cfg.num_shards - 1) / cfg.num_shards,
            "bytes": total, "how": "text files"}


# -----------------------------------------------------------------------------
# What each stage will read, and where it comes from

# a data stage's list -> how one of its sets is named in `data fetch`
FETCH_HINT = {"pretraining": "python -m jobs data fetch {name} --shards N",
              "conversations": "python -m jobs data fetch {name}",
              "evals": "python -m jobs data fetch --evals {name}"}


def stage_needs(stage, base_dir: Path) -> list[dict]:
    """The datasets a stage will read that a data stage provides: [{"key", "path", "field", "name"}],
    field being the data stage's list that names the set (pretraining, conversations, evals)."""
    from nanochat import fetch
    from nanochat.datasets_chat import CHAT_SETS, converted_path, mixture_parts
    from nanochat.eval_data import eval_path
    cfg = stage_config(stage)
    needs = []
    if stage.kind in PRETRAIN_KINDS and cfg.data_source in fetch.PRETRAINING_SETS:
        needs.append({"key": "data_source", "path": fetch.pretraining_dir(base_dir, cfg.data_source),
                      "field": "pretraining", "name": cfg.data_source})
    if stage.kind in ("mid_train", "sft") and cfg.data_path:
        for part, _ in mixture_parts(cfg.data_path):
            if part in CHAT_SETS:
                needs.append({"key": "data_path", "path": converted_path(base_dir, part), "field": "conversations",
                              "name": part})
    if stage.kind in ("base_eval", "chat_eval") and not cfg.data_dir:
        tasks = ["core"] if stage.kind == "base_eval" else [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        needs += [{"key": "data_dir" if stage.kind == "base_eval" else "tasks", "path": eval_path(base_dir, t),
                   "field": "evals", "name": t} for t in tasks]
    return needs


def _present(need: dict, base_dir: Path) -> bool:
    from nanochat import fetch
    from nanochat.datasets_chat import converted_path
    from nanochat.eval_data import is_present
    if need["field"] == "pretraining":
        return len(fetch.present(need["path"], sorted(fetch.read_manifest(need["path"]).get("files", {})))) >= 2
    if need["field"] == "conversations":
        path = converted_path(base_dir, need["name"])
        return path.is_file() and path.with_suffix(".json").is_file()
    return is_present(base_dir, need["name"])


def _user_data_dir(pipeline, stage) -> None:
    """An evaluation stage's own data_dir (not the work directory's): its files must be there now."""
    from nanochat.tasks.common import find_task_file
    cfg = stage_config(stage)
    if stage.kind not in ("base_eval", "chat_eval") or cfg.data_dir in ("", "fixtures"):
        return
    where = f"{pipeline.source}: stages.{stage.name}.args.data_dir"
    if stage.kind == "base_eval":
        core = Path(cfg.data_dir) / "eval_bundle" / "core.yaml"
        if not core.is_file():
            raise ConfigError(f"{where}: {core}: missing (the CORE bundle's task list)")
        return
    for task in (t.strip() for t in cfg.tasks.split(",") if t.strip()):
        try:
            find_task_file(Path(cfg.data_dir), task)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def data_sources(pipeline, base_dir: Path) -> list[dict]:
    """Every dataset a stage reads, with where it comes from: {"stage", "key", "path", "field", "name",
    "from"}: "from" is the data stage before it that fetches it, "present" (in the work directory
    already), or None: then the stage would fail at its start, and submit refuses the pipeline."""
    from jobs.spec import ancestors
    out = []
    for s in pipeline.stages.values():
        if s.kind == "data":
            continue
        _user_data_dir(pipeline, s)
        before = ancestors(pipeline.stages, s.name)
        for need in stage_needs(s, base_dir):
            providers = [d.name for d in pipeline.stages.values() if d.kind == "data" and _provides(d, need)]
            ok = [d for d in providers if d in before]
            source = ok[0] if ok else "present" if _present(need, base_dir) else None
            out.append({**need, "stage": s.name, "from": source, "providers": providers})
    return out


def _provides(data_stage, need: dict) -> bool:
    value = data_stage.args.get(need["field"])
    return value == need["name"] if need["field"] == "pretraining" else need["name"] in (value or [])


def check_sources(pipeline, sources: list[dict]) -> None:
    """Exit 2 (ConfigError) for the first dataset a stage reads that nothing will have put in place."""
    for n in sources:
        if n["from"] is not None:
            continue
        where = f"{pipeline.source}: stages.{n['stage']}.args.{n['key']}"
        if n["providers"]:
            raise ConfigError(f"{where}: {n['path']}: missing; stage {n['providers'][0]} fetches {n['name']} but "
                              f"{n['stage']} does not depend on it (add it to depends_on)")
        raise ConfigError(f"{where}: {n['path']}: missing, and no `data` stage before {n['stage']} fetches it "
                          f"(add {n['name']} to a data stage's {n['field']}, or fetch it first: "
                          + FETCH_HINT[n["field"]].format(name=n["name"]) + ")")


def plan_pipeline(pipeline, base_dir: str | Path = "", fill: bool = True, log=print) -> dict:
    """The data plan. fill: give data stages with num_shards 0 the count their training stages need
    (in pipeline.stages and pipeline.raw, so the run's resolved.yaml carries it). Raises ConfigError
    (exit 2) when a stage would read data that nothing puts in place, or a training stage would
    pass max_data_epochs."""
    from nanochat import fetch
    from nanochat.datasets_chat import CHAT_SETS
    from nanochat.dataset import data_epochs_guard
    from nanochat.eval_data import EVAL_BUNDLE_SHA256, EVAL_BUNDLE_URL, EVAL_SETS, is_present
    base_dir = Path(base_dir or get_base_dir())
    train = {}
    for s in pipeline.stages.values():
        if s.kind in PRETRAIN_KINDS:
            tokens, how = training_tokens(s)
            train[s.name] = {"tokens": tokens, "how": how}
    data_stages = []
    for s in pipeline.stages.values():
        if s.kind != "data":
            continue
        name, shards = s.args.get("pretraining") or "", int(s.args.get("num_shards") or 0)
        entry = {"stage": s.name, "pretraining": name, "num_shards": shards,
                 "conversations": list(s.args.get("conversations") or []), "evals": list(s.args.get("evals") or [])}
        if name:
            ds = fetch.pretraining_set(name)
            if shards <= 0:
                needs = [train[t.name]["tokens"] for t in pipeline.stages.values()
                         if t.kind in PRETRAIN_KINDS and stage_config(t).data_source == name and train[t.name]["tokens"]]
                if not needs:
                    raise ConfigError(f"{pipeline.source}: stages.{s.name}.args.num_shards: 0 needs a training stage with "
                                      f"data_source: {name} and a known token budget; give num_shards")
                shards = fetch.shards_for_tokens(ds, max(needs))
                entry["num_shards_from"] = "the training stages' token budget (+10%)"
                if fill:
                    s.args["num_shards"] = shards
                    pipeline.raw["stages"][s.name].setdefault("args", {})
                    pipeline.raw["stages"][s.name]["args"] = {**(pipeline.raw["stages"][s.name]["args"] or {}),
                                                              "num_shards": shards}
            entry.update(num_shards=shards, repo_id=ds.repo_id, revision=s.args.get("revision") or ds.revision,
                         bytes=shards * ds.bytes_per_shard,
                         tokens=(shards - 1) * ds.chars_per_shard / ds.chars_per_token,
                         present=len(fetch.present(fetch.pretraining_dir(base_dir, name), fetch.shard_files(ds, shards))))
        entry["conversation_sets"] = [_split_entry(base_dir, c, CHAT_SETS[c].split) for c in entry["conversations"]
                                      if c in CHAT_SETS]
        entry["eval_sets"] = []
        for e in entry["evals"]:
            if e not in EVAL_SETS:
                continue
            if EVAL_SETS[e].split is None:
                sha = s.args.get("eval_bundle_sha256") or EVAL_BUNDLE_SHA256
                one = {"set": e, "source": s.args.get("eval_bundle_url") or EVAL_BUNDLE_URL,
                       "revision": f"sha256:{sha[:12]}", "rows": None,
                       "bytes": _fetched_bytes(fetch.hub_repo_dir(base_dir, "eval_bundle"))}
            else:
                one = _split_entry(base_dir, e, EVAL_SETS[e].split)
            entry["eval_sets"].append({**one, "present": is_present(base_dir, e)})
        data_stages.append(entry)
    for name, t in train.items():
        stage = pipeline.stages[name]
        d = pretraining_data(pipeline, stage, base_dir)
        ds = fetch.PRETRAINING_SETS.get(stage_config(stage).data_source)
        d["tokens"] = d["chars"] / (ds.chars_per_token if ds else fetch.CHARS_PER_TOKEN)
        t["data"] = d
        if t["tokens"] and d["shards"] >= 2:
            t["epochs"] = data_epochs_guard(name, d["dir"], t["tokens"], d["tokens"],
                                            float(getattr(stage_config(stage), "max_data_epochs", 0) or 0), log=log)
    mixtures = {s.name: _mixture_epochs(s, base_dir, log) for s in pipeline.stages.values() if s.kind == "mid_train"}
    sources = data_sources(pipeline, base_dir)
    plan = {"pipeline": pipeline.name, "base_dir": str(base_dir),
            "chars_per_token": {**{k: round(v.chars_per_token, 2) for k, v in fetch.PRETRAINING_SETS.items()},
                                "other": fetch.CHARS_PER_TOKEN},
            "data_stages": data_stages, "training": train, "mixtures": mixtures,
            "sources": [{k: (str(v) if isinstance(v, Path) else v) for k, v in n.items()} for n in sources]}
    return plan


def _split_entry(base_dir: Path, name: str, split) -> dict:
    """A hub split in the plan: its source, commit, rows (about), bytes (listed by the hub once fetched)."""
    from nanochat import fetch
    dest = fetch.hub_repo_dir(base_dir, split.repo_id)
    manifest = fetch.read_manifest(dest)
    names = manifest.get("splits", {}).get(split.key) or []
    listed = sum((manifest["files"].get(n) or {}).get("size") or 0 for n in names) if names else 0
    return {"set": name, "source": f"{split.repo_id} {split.key}", "revision": split.revision[:12], "rows": split.rows,
            "bytes": listed or split.bytes or None, "files": len(names) or None}


def _fetched_bytes(dest: Path) -> int | None:
    from nanochat import fetch
    return sum((e or {}).get("size") or 0 for e in fetch.read_manifest(dest).get("files", {}).values()) or None


def _mixture_epochs(stage, base_dir: Path, log) -> dict:
    """A mid-training stage's passes over its conversations, where they are already in place (the
    converted sets record their characters); otherwise the stage checks at its start."""
    from nanochat import fetch
    from nanochat.dataset import data_epochs_guard
    from nanochat.datasets_chat import mixture_chars
    cfg = stage_config(stage)
    total = cfg.total_batch_size or (cfg.device_batch_size * cfg.seq_len * _world_size(stage)
                                     if cfg.device_batch_size > 0 else 0)
    tokens = float(cfg.num_steps * total) if cfg.num_steps and total else None
    chars = mixture_chars(cfg.data_path, base_dir) if cfg.data_path else None
    out = {"tokens": tokens, "data": cfg.data_path or "(synthetic)", "data_tokens": None, "epochs": None}
    if tokens and chars:
        out["data_tokens"] = chars / fetch.CHARS_PER_TOKEN
        out["epochs"] = data_epochs_guard(stage.name, cfg.data_path, tokens, out["data_tokens"],
                                          float(cfg.max_data_epochs or 0), log=log)
    return out


def check_pipeline_data(pipeline, log=print) -> dict:
    """submit's data check, before anything is submitted: fill num_shards; refuse (exit 2) a stage
    that would read data nothing puts in place, or a training stage past its max_data_epochs."""
    plan = plan_pipeline(pipeline, fill=True, log=log)
    check_sources(pipeline, plan["sources"])
    return plan


def format_plan(plan: dict) -> str:
    def n(x):
        return "?" if x is None else f"{x / 1e9:,.2f}B" if x >= 1e9 else f"{x / 1e6:,.1f}M" if x >= 1e6 else f"{x:,.0f}"

    def size(b):
        return "size listed at fetch" if not b else f"{b / 1e9:,.2f} GB" if b >= 1e9 else f"{b / 1e6:,.2f} MB"
    cpt = ", ".join(f"{k} {v}" for k, v in plan["chars_per_token"].items())
    lines = [f"data plan of {plan['pipeline']} (base_dir {plan['base_dir']}; tokens estimated at chars/token "
             f"{cpt}; the stages measure their own)"]
    for d in plan["data_stages"]:
        lines.append(f"  stage {d['stage']} (data):")
        if d["pretraining"]:
            lines.append(f"    {d['pretraining']:<18} {d['repo_id']}@{str(d['revision'])[:12]}: {d['num_shards']} "
                         "shards "
                         f"({d['num_shards'] - 1} train + 1 validation), ~{d['bytes'] / 1e9:,.1f} GB, ~{n(d['tokens'])} tokens, "
                         f"{d['present']} present" + (f"; count from {d['num_shards_from']}" if d.get("num_shards_from") else ""))
        for c in d["conversation_sets"] + d["eval_sets"]:
            rows = f"~{c['rows']:,} rows, " if c.get("rows") else ""
            state = "; present" if c.get("present") else ""
            lines.append(f"    {c['set']:<18} {c['source']}@{c['revision']}: {rows}{size(c['bytes'])}{state}")
    for name, t in plan["training"].items():
        d = t.get("data", {})
        ep = t.get("epochs")
        lines.append(f"  stage {name}: trains on {n(t['tokens'])} tokens ({t['how']}); data {d.get('source')} "
                     f"({d.get('shards')} shards, ~{n(d.get('tokens'))} tokens) -> "
                     + ("? epochs" if ep is None else f"{ep:,.2f} epochs"))
    for name, m in plan.get("mixtures", {}).items():
        lines.append(f"  stage {name}: trains on {n(m['tokens'])} tokens of {m['data']} -> "
                     + (f"{m['epochs']:,.2f} epochs" if m["epochs"] is not None
                        else "? epochs (the sets are fetched by this run: the stage checks at its start)"))
    missing = [s for s in plan.get("sources", []) if s["from"] is None]
    if missing:
        lines.append("  missing (nothing puts them in place; submit refuses the pipeline):")
        lines += [f"    stage {s['stage']} {s['key']}: {s['path']}" for s in missing]
    return "\n".join(lines)
