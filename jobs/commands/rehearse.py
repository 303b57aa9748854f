"""
`python -m jobs rehearse PIPELINE`: the pipeline as shipped, every stage and dependency, run on the
local two-node Slurm before it costs a GPU hour, with only its sizes scaled down and its resources
mapped onto this machine; the hub is a server on 127.0.0.1 (jobs.local_hub) serving small files the
project makes in the real formats and layouts of every set the pipeline names (jobs.hub_files).

What runs for real: the data stage (listing, downloads, checksums, the bundle's unpacking, the
conversions, tokenizer training) into a fresh work directory, then every other stage as the YAML
has it (its kinds, dependencies, ranks and nodes, checkpoints, the hub offline), sacct, and the
report, whose report card must have a row per evaluation task. What it overrides is printed, one
line per key: that is what the rehearsal did not test.

    python -m jobs rehearse artemis-a100 [--set KEY=VALUE ...] [--run-id ID] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs import slurm
from nanochat.errors import ConfigError

# The sizes: the smallest that still take every code path (several optimizer steps, an eval, a
# checkpoint, the chat format). (config key, rehearsal value, stage kinds, why)
ARG_SIZES = (
    ("depth", 2, None, "2 layers: the recipe's code paths, not its quality"),
    ("vocab_size", 512, None, "a tokenizer the small generated corpus can train"),
    ("seq_len", 128, ("base_train", "mid_train", "sft"), "rows a 2-core machine trains in seconds"),
    ("total_batch_size", 2048, ("base_train", "mid_train"), "8 rows of 128 per rank and step at 2 ranks"),
    ("num_steps", 10, ("base_train", "mid_train"), "a few optimizer steps (the YAML's budget is hours of GPU)"),
)
# What this machine has instead of the cluster's request. (resource key, value, why)
RESOURCES = (
    ("gpus_per_node", 0, "no GPU here: CPU ranks over gloo"),
    ("cpus_per_task", 1, "one core per rank (2 cores here)"),
    ("mem_gb", 0, "the local node's memory"),
    ("partition", "", "the local Slurm's one partition"),
    ("constraint", "", "no node features here"),
)
CLUSTER_KEYS = ("partition", "account", "qos", "constraint")
ROWS_PER_SET = 8          # rows of each generated test split: the evaluation stages score them all
TRAIN_ROWS = 200          # rows of each generated training split: SFT's 2 ranks need whole steps of packed rows
CHARS_PER_SHARD = 200_000  # generated pretraining shards


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline spec: a path or a name in pipelines/ (e.g. artemis-a100)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value before the rehearsal's own (as in submit)")
    p.add_argument("--run-id", default=None, help="name the run (default: rehearse-<pipeline>-<UTC time>)")
    p.add_argument("--workdir", default="", help="the fresh work directory (default: <work dir>/rehearsal/<run id>)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


@dataclass
class Override:
    key: str                  # as printed
    shipped: str
    rehearsal: str
    why: str
    stages: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)   # the --set items behind it

    def line(self) -> str:
        where = f" [{', '.join(self.stages)}]" if self.stages else ""
        return f"  {self.key:<32} {self.shipped} -> {self.rehearsal}{where}: {self.why}"


def _fmt(v) -> str:
    return repr(v) if isinstance(v, str) else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def plan_overrides(pipeline) -> list[Override]:
    """What the rehearsal changes in the loaded pipeline, one Override per key: resources mapped
    onto this machine, sizes scaled down; nodes, tasks_per_node, stages and dependencies kept."""
    import dataclasses
    from jobs.spec import config_class
    from nanochat.recipes.probe import SERVED_KEYS
    out: dict[str, Override] = {}

    def add(key, shipped, value, why, stage, item):
        o = out.setdefault(key, Override(key, "", _fmt(value), why))
        shown = _fmt(shipped)
        if shown not in o.shipped.split(" / "):
            o.shipped = f"{o.shipped} / {shown}" if o.shipped else shown
        if stage and stage not in o.stages:
            o.stages.append(stage)
        o.sets.append(item)

    for key in CLUSTER_KEYS:
        if getattr(pipeline.cluster, key):
            add(f"cluster.{key}", getattr(pipeline.cluster, key), "", "the local Slurm has no such thing", None,
                f"cluster.{key}=")
    for s in pipeline.stages.values():
        for key, value, why in RESOURCES:
            if getattr(s.resources, key) != value:
                add(f"resources.{key}", getattr(s.resources, key), value, why, s.name,
                    f"{s.name}.resources.{key}={value}")
    for key, value in (("depth", 2), ("vocab_size", 512)):
        if key in pipeline.default_args and pipeline.default_args[key] != value:
            why = next(w for k, _, _, w in ARG_SIZES if k == key)
            add(f"defaults.args.{key}", pipeline.default_args[key], value, why, None, f"defaults.{key}={value}")
    for s in pipeline.stages.values():
        cls = config_class(s.kind)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        own = (pipeline.raw["stages"][s.name] or {}).get("args") or {}
        for key, value, kinds, why in ARG_SIZES:
            if key not in fields or (kinds is None and key not in own) or (kinds is not None and s.kind not in kinds):
                continue
            if s.kind == "probe" and s.args.get("serves") and key in SERVED_KEYS:
                continue    # the probe takes its shape from the stage it serves
            f = fields[key]
            shipped = s.args.get(key, f.default)
            if key == "num_steps" and shipped == 0 and "target_param_data_ratio" in fields:
                shipped = f"0 (from target_param_data_ratio {s.args.get('target_param_data_ratio', 20.0):g})"
            elif shipped == value:
                continue
            add(f"args.{key}", shipped, value, why, s.name, f"{s.name}.{key}={value}")
    return list(out.values())


def check_fits(pipeline, nodes: int) -> None:
    """The rehearsal keeps every stage's nodes and ranks: the local Slurm must have the nodes."""
    for s in pipeline.stages.values():
        if s.resources.nodes > nodes:
            raise ConfigError(f"{pipeline.source}: stages.{s.name}.resources.nodes: {s.resources.nodes} nodes, the "
                              f"local Slurm has {nodes} (bash sbatch/slurm_local.sh up --nodes {s.resources.nodes})")


def hub_sets(pipeline) -> tuple[dict[str, int], list[str], bool]:
    """What the hub must serve for the pipeline's data stages: {pretraining set: shards}, hub split
    keys, and whether the CORE bundle is fetched."""
    from nanochat.datasets_chat import CHAT_SETS
    from nanochat.eval_data import EVAL_SETS
    from nanochat.fetch import HUB_SPLITS
    pre, splits, bundle = {}, [], False
    keys = {v: k for k, v in HUB_SPLITS.items()}
    for s in pipeline.stages.values():
        if s.kind != "data":
            continue
        if s.args.get("pretraining"):
            pre[s.args["pretraining"]] = max(pre.get(s.args["pretraining"], 0), int(s.args.get("num_shards") or 0))
        for c in s.args.get("conversations") or []:
            splits.append(keys[CHAT_SETS[c].split])
        for e in s.args.get("evals") or []:
            if EVAL_SETS[e].split is None:
                bundle = True
            else:
                splits.append(keys[EVAL_SETS[e].split])
    return pre, sorted(set(splits)), bundle


def _report_card(run_dir: Path) -> str:
    text = (run_dir / "summary.md").read_text() if (run_dir / "summary.md").is_file() else ""
    if "## Report card" not in text:
        return ""
    card = text.split("## Report card", 1)[1].split("\n## ", 1)[0]
    return "\n".join(ln for ln in card.strip().splitlines() if ln.startswith("|"))


def expected_tasks(pipeline, workdir: Path) -> dict[str, list[str]]:
    """{evaluation stage: the report card rows it must have}: the bundle's CORE tasks and CORE; the
    chat tasks (and their broadcast rows) and ChatCORE."""
    import yaml
    from nanochat.tasks.common import resolve_data_dir
    out = {}
    for s in pipeline.stages.values():
        if s.kind == "base_eval":
            core = resolve_data_dir(s.args.get("data_dir", ""), str(workdir)) / "eval_bundle" / "core.yaml"
            spec = (yaml.safe_load(core.read_text()) or {}) if core.is_file() else {}
            out[s.name] = [t["label"] for t in spec.get("icl_tasks", [])] + ["CORE"]
        elif s.kind == "chat_eval":
            from nanochat.evaluate import GENERATIVE
            from nanochat.recipes.chat_eval import ChatEvalConfig
            tasks = [t.strip() for t in str(s.args.get("tasks", ChatEvalConfig.tasks)).split(",") if t.strip()]
            extra = [f"{t}.broadcast" for t in tasks if t in GENERATIVE] if s.args.get("compare_broadcast") else []
            out[s.name] = tasks + extra + ["ChatCORE"]
    return out


def _serve(hub, pipeline, sets: list[str]) -> list[Override]:
    """Put every set the pipeline's data stages name in the hub; point the data stages that fetch
    the CORE bundle at the hub's zip (sets += those --set items). Returns the lines to print."""
    from jobs import hub_files
    pre, splits, bundle = hub_sets(pipeline)
    served = hub_files.populate(hub, pre, splits, bundle, rows=ROWS_PER_SET, train_rows=TRAIN_ROWS,
                                chars_per_shard=CHARS_PER_SHARD)
    lines = [Override("hub (HF_ENDPOINT)", "https://huggingface.co", hub.endpoint,
                      "the project's small files in the sets' real formats, at the pinned commits")]
    if bundle:
        names = [s.name for s in pipeline.stages.values() if s.kind == "data" and "core" in (s.args.get("evals") or [])]
        for name in names:
            sets += [f"{name}.eval_bundle_url={served['url']}", f"{name}.eval_bundle_sha256={served['sha256']}"]
        lines.append(Override("args.eval_bundle_url/_sha256", "nanochat's (pinned sha256 90a7c19e...)",
                              "the hub's zip and its sha256", "a bundle the project made", names))
    return lines


def _outcome(pipeline, run_dir: Path, workdir: Path) -> dict:
    """What the run left: sacct per stage (pipeline order), the data stage's fetch table, the report
    card and the evaluation rows it lacks."""
    jobs_file = run_dir / "jobs.json"
    recs = json.loads(jobs_file.read_text()).get("stages", {}) if jobs_file.is_file() else {}
    ids = {name: str(rec["job_id"]) for name, rec in recs.items() if rec.get("job_id")}
    fields = ["JobID", "State", "NodeList", "NNodes", "Elapsed", "ExitCode"]
    table = (slurm.sacct_table(list(ids.values()), fields, timeout_s=60)[0] or {}) if ids else {}
    acct = {j: {k.lower(): v for k, v in line.items()} for j, line in table.items()}
    stages = [{"stage": n, "job_id": ids[n], **acct.get(ids[n], {})} for n in pipeline.stages if n in ids]
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "rows").glob("*.json"))] if run_dir.is_dir() else []
    data_rows = [r for r in rows if r.get("kind") == "data"]
    fetch = json.loads(data_rows[0].get("extra") or "{}").get("sets", []) if data_rows else []
    card = _report_card(run_dir)
    on_card = {(ln.split("|")[1].strip(), ln.split("|")[2].strip()) for ln in card.splitlines()[2:]}
    missing = [f"{st}:{t}" for st, tasks in expected_tasks(pipeline, workdir).items() for t in tasks
               if (st, t) not in on_card]
    states = {s["stage"]: s.get("state") for s in stages}
    not_completed = [n for n in pipeline.stages if states.get(n) != "COMPLETED"]
    return {"stages": stages, "fetch": fetch, "report_card": card, "report_card_missing": missing,
            "not_completed": not_completed}


def _print_outcome(out: dict) -> None:
    from nanochat.recipes.data import format_fetch_table
    print("\nsacct:", flush=True)
    for s in out["stages"]:
        print(f"  {s['stage']:<16} {s['job_id']:<8} {s.get('state', '-'):<11} {s.get('nodelist', '-'):<8} "
              f"nodes={s.get('nnodes', '-')} elapsed={s.get('elapsed', '-')}", flush=True)
    print("\nfetch table (the data stage):\n" + (format_fetch_table(out["fetch"]) if out["fetch"] else "(none)"))
    print("\nreport card:\n" + (out["report_card"] or "(none)"), flush=True)


def run(args) -> int:
    from jobs import cli, data_plan, runs, spec, submit
    from jobs.local_hub import LocalHub
    from nanochat.files import atomic_write_json, get_base_dir
    t0 = time.perf_counter()
    path = spec.resolve_pipeline_path(args.pipeline)
    shipped = spec.load_pipeline(path, args.sets)
    submit.choose_executor("slurm")            # exit 2 with one line where there is no Slurm
    nodes = slurm.usable_nodes()
    check_fits(shipped, len(nodes))
    overrides = plan_overrides(shipped)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = runs.checked_run_id(shipped, args.run_id or f"rehearse-{shipped.name}-{stamp}")
    workdir = Path(args.workdir or Path(get_base_dir()) / "rehearsal" / run_id).resolve()
    if workdir.exists() and any(workdir.iterdir()):
        raise ConfigError(f"--workdir {workdir}: not empty (the rehearsal fetches into a fresh work directory)")
    sets = list(args.sets) + [item for o in overrides for item in o.sets]
    pipeline = spec.load_pipeline(path, sets)
    # submit's own data check, here before anything starts: the shard counts it will ask the hub for,
    # and exit 2 for a stage whose data nothing puts in place (what a cluster would find hours later)
    plan = data_plan.plan_pipeline(pipeline, workdir, fill=True, log=lambda *a: None)
    data_plan.check_sources(pipeline, plan["sources"])
    hub = LocalHub().start()
    try:
        extra = _serve(hub, pipeline, sets)
        extra.append(Override("work directory", str(get_base_dir()), str(workdir), "fresh: the data stage fetches all"))
        print(f"rehearsal of {path} as shipped ({len(shipped.stages)} stages: {', '.join(shipped.stages)}) on the "
              f"local Slurm ({', '.join(nodes)}); overridden, one line per key (not rehearsed):", flush=True)
        print("\n".join(o.line() for o in overrides + extra), flush=True)
        os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1", NANOCHAT_BASE_DIR=str(workdir))
        os.environ.pop("HF_HUB_OFFLINE", None)
        workdir.mkdir(parents=True, exist_ok=True)
        rc = cli.cmd_submit(argparse.Namespace(pipeline=str(path), executor="slurm", sets=sets, wait=True,
                                               run_id=run_id, max_parallel=1, dry_run=False, json=False))
    finally:
        hub.stop()
    run_dir = runs.results_root(pipeline) / run_id
    out = _outcome(pipeline, run_dir, workdir)
    _print_outcome(out)
    wall = time.perf_counter() - t0
    ok = rc == 0 and not out["not_completed"] and not out["report_card_missing"]
    verdict = ("COMPLETED" if ok else
               f"FAILED: stages not COMPLETED in sacct: {', '.join(out['not_completed'])}" if out["not_completed"] else
               f"FAILED: the report card lacks {', '.join(out['report_card_missing'])}" if out["report_card_missing"]
               else "FAILED")
    print(f"\nrehearsal {verdict} in {wall:.0f} s (run {run_id}: {run_dir}; work directory {workdir})", flush=True)
    result = {"run_id": run_id, "run_dir": str(run_dir), "workdir": str(workdir), "wall_seconds": round(wall, 1),
              "state": "COMPLETED" if ok else "FAILED", "overrides": [vars(o) for o in overrides + extra], **out}
    if run_dir.is_dir():
        atomic_write_json(run_dir / "rehearsal.json", result)
    if not ok:
        result["error"] = verdict
    if args.json:
        print(json.dumps({**result, "exit_code": 0 if ok else 1}, sort_keys=True, default=str), flush=True)
    return 0 if ok else 1
