"""
The pipeline model: a YAML spec (pipelines/*.yaml, documented key by key in pipelines/README.md)
parsed into plain dataclasses and validated completely before anything is submitted.

Every problem becomes one nanochat.errors.ConfigError line naming the file and the key, e.g.
    pipelines/x.yaml: stages.base.args.devce_batch_size: unknown key (did you mean device_batch_size?)
Stage `args` are checked against the fields of the stage kind's config dataclass, imported lazily
(importing a recipe imports torch; the CLI's --help stays fast because cli.py imports this lazily).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nanochat.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
# a checkout's pipelines/, else the copy an installed package carries (pyproject.toml: jobs.pipelines)
PIPELINES_DIR = REPO_ROOT / "pipelines" if (REPO_ROOT / "pipelines").is_dir() else Path(__file__).resolve().parent / "pipelines"
DEFAULT_PIPELINE = PIPELINES_DIR / "smoke.yaml"

# stage kind -> (module, config class): the recipe of kind K is nanochat.recipes.K (docs/CONTRACTS.md):
# module.run(cfg, should_stop=None) -> dict | list[dict].
KINDS: dict[str, tuple[str, str]] = {
    "data": ("nanochat.recipes.data", "DataConfig"),  # fetch and verify datasets (where the network is)
    "probe": ("nanochat.recipes.probe", "ProbeConfig"),
    "base_train": ("nanochat.recipes.base_train", "BaseTrainConfig"),
    "mid_train": ("nanochat.recipes.mid_train", "MidTrainConfig"),
    "sft": ("nanochat.recipes.sft", "SFTConfig"),
    "inference_bench": ("nanochat.recipes.inference_bench", "InferenceBenchConfig"),
    "base_eval": ("nanochat.recipes.base_eval", "BaseEvalConfig"),   # CORE (after base/mid training)
    "chat_eval": ("nanochat.recipes.chat_eval", "ChatEvalConfig"),   # ARC, MMLU, GSM8K, HumanEval, ChatCORE (after SFT)
    "noop": ("jobs.stages", "NoopConfig"),  # built in: tests a cluster (sleep, fail, checkpoint, all-reduce)
}
# Fields every recipe config has that the jobs layer fills; a spec may not set them.
FILLED_BY_JOBS = ("base_dir", "out_dir")
# Stage args naming user-supplied data -> the library check the stage's own loader runs on it, so a
# bad line fails `submit` (before any job) with the message the stage would have given hours later.
DATA_FILE_CHECKS: dict[str, tuple[str, str]] = {
    "data_path": ("nanochat.datasets_chat", "check_mixture"),   # sft, mid_train: JSONL / parquet files of a mixture
    "data_source": ("nanochat.prepare", "check_data_source"),             # base_train: shards or text folder
    "init_from": ("nanochat.checkpoint", "resolve_checkpoint_dir"),       # a checkpoint path (not a stage name)
}


@dataclass
class Resources:
    """What one stage asks Slurm for. Local runs ignore everything but the stage order."""
    nodes: int = 1
    tasks_per_node: int = 1       # = GPUs per node for a distributed stage (one rank per task)
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0             # 0: the partition's default
    time_min: int = 60
    max_requeues: int = 1         # requeues after preemption/time limit before the stage fails
    signal_delay_s: int = 60      # USR2 this long before the time limit: the stage checkpoints
    partition: str = ""           # "" = cluster.partition (a data stage may need one that reaches the internet)
    constraint: str = ""          # "" = cluster.constraint


RESOURCE_LIMITS = {  # key -> (min, max)
    "nodes": (1, 1024), "tasks_per_node": (1, 64), "gpus_per_node": (0, 16), "cpus_per_task": (1, 512),
    "mem_gb": (0, 16384), "time_min": (1, 7 * 24 * 60), "max_requeues": (0, 20), "signal_delay_s": (0, 3600),
}


@dataclass
class Cluster:
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    setup: list[str] = field(default_factory=list)   # shell lines run before each job (module load ...)
    # cluster-wide resource defaults (a stage's resources and defaults.resources override them)
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0
    time_min: int = 60


@dataclass
class Variant:
    name: str
    args: dict


@dataclass
class Stage:
    name: str
    kind: str
    depends_on: list[str]
    resources: Resources
    args: dict                      # defaults.args merged with the stage's args
    variants: list[Variant]         # non-empty: the stage runs as a job array, one task per variant

    @property
    def num_tasks(self) -> int:
        return max(1, len(self.variants))


@dataclass
class Pipeline:
    name: str
    description: str
    results_dir: str
    cluster: Cluster
    stages: dict[str, Stage]        # in dependency (topological) order
    source: str                     # the file it came from, for messages
    raw: dict                       # the resolved spec as plain data (written to the run folder)
    default_args: dict = field(default_factory=dict)   # defaults.args (each stage takes the keys its kind knows)


TOP_KEYS = ("name", "description", "results_dir", "cluster", "defaults", "stages", "tracking")
DEFAULTS_KEYS = ("args", "resources")
STAGE_KEYS = ("kind", "depends_on", "resources", "args", "variants")
VARIANT_KEYS = ("name", "args")
# Stage and variant names become path components (rows/<stage>__..., <stage>/<variant>/): no '/', '..' or spaces.
STAGE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
VARIANT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
# Values that reach sbatch lines (job name, #SBATCH --partition=...): a newline or a quote there
# becomes shell in the job script. The pipeline name also names run folders.
PIPELINE_NAME_RE = VARIANT_NAME_RE
SLURM_LIST_RE = re.compile(r"^[A-Za-z0-9_.\-]+(,[A-Za-z0-9_.\-]+)*$")     # partition, account, qos: a,b
CONSTRAINT_RE = re.compile(r"^[A-Za-z0-9_.\-&|,()\[\]*:=!]+$")        # Slurm features: a100&ib, [r1|r2]
SLURM_VALUE_RULES = {"partition": (SLURM_LIST_RE, "letters, digits, _, - and ., comma-separated"),
                     "account": (re.compile(r"^[A-Za-z0-9_.\-]+$"), "letters, digits, _, - and ."),
                     "qos": (SLURM_LIST_RE, "letters, digits, _, - and ., comma-separated"),
                     "constraint": (CONSTRAINT_RE, "feature names with & | , * : = ! ( ) [ ], no spaces")}


class SpecError:
    """Builds ConfigError lines that name the file and the key."""

    def __init__(self, source: str):
        self.source = source

    def __call__(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")


def _suggest(name: str, choices) -> str:
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close and len(name) >= 3:  # a shortened key: gpus -> gpus_per_node
        close = [c for c in choices if c.startswith(name)][:1]
    return f" (did you mean {close[0]}?)" if close else ""


def _check_keys(err: SpecError, where: str, mapping: dict, allowed) -> None:
    for k in mapping:
        if not isinstance(k, str):
            raise err(f"{where}.{k}" if where else str(k), "keys must be strings")
        if k not in allowed:
            key = f"{where}.{k}" if where else k
            raise err(key, f"unknown key{_suggest(k, allowed)}")


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def value_matches(value, annotation) -> bool:
    """Does a YAML value fit a dataclass field annotation (int, float, str, bool, list[X], dict, Optional)?
    bool is not an int here; an int is a float."""
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and (not inner or all(value_matches(v, inner[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _check_fields(err: SpecError, where: str, values: dict, cls, skip=()) -> None:
    """Unknown keys (with a near-miss suggestion), renamed keys (naming the new one: a recipe's
    renamed_keys) and wrong types against a dataclass's fields."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    renamed = getattr(cls, "renamed_keys", {})
    for k, v in values.items():
        if k in skip:
            raise err(f"{where}.{k}", "is set by the pipeline runner, not the spec")
        if k in renamed and k not in names:
            raise err(f"{where}.{k}", f"renamed: write {renamed[k]} instead")
        if k not in names:
            raise err(f"{where}.{k}", f"unknown key{_suggest(str(k), names)}")
        if not value_matches(v, hints[k]):
            raise err(f"{where}.{k}", f"expected {_type_name(hints[k])}, got {type(v).__name__} {v!r}")


def config_class(kind: str):
    """The config dataclass of a stage kind (imports the recipe module)."""
    module_name, class_name = KINDS[kind]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def _check_slurm_values(err: SpecError, where: str, values: dict) -> None:
    for k, (pattern, allowed) in SLURM_VALUE_RULES.items():
        v = values.get(k)
        if isinstance(v, str) and v and not pattern.fullmatch(v):
            raise err(f"{where}.{k}", f"{v!r}: {allowed}")


def _check_resources(err: SpecError, where: str, values: dict) -> None:
    _check_fields(err, where, values, Resources)
    _check_slurm_values(err, where, values)
    for k, v in values.items():
        if k not in RESOURCE_LIMITS:   # partition, constraint: names
            continue
        lo, hi = RESOURCE_LIMITS[k]
        if not lo <= v <= hi:
            raise err(f"{where}.{k}", f"{v!r} out of range [{lo}, {hi}]")


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """--set KEY=VALUE, the value parsed as YAML. KEY forms:
       STAGE.arg=v, STAGE.args.arg=v, STAGE.resources.time_min=v, STAGE.kind=v,
       defaults.arg=v (into defaults.args), defaults.resources.k=v, cluster.k=v, results_dir=v."""
    raw = copy.deepcopy(raw)
    err = SpecError(source)
    for item in overrides:
        if "=" not in item:
            raise err(f"--set {item}", "expected KEY=VALUE")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as e:
            raise err(f"--set {key}", f"value is not valid YAML ({str(e).splitlines()[0]})") from None
        parts = key.strip().split(".")
        if any(not p for p in parts):
            raise err(f"--set {key}", "empty key part")
        head = parts[0]
        if head in ("name", "description", "results_dir") and len(parts) == 1:
            path = parts
        elif head == "cluster":
            path = parts
        elif head == "defaults":
            path = parts if len(parts) > 2 and parts[1] in DEFAULTS_KEYS else ["defaults", "args", *parts[1:]]
        else:
            stages = raw.get("stages") or {}
            if not isinstance(stages, dict) or head not in stages:
                names = list(stages) if isinstance(stages, dict) else []
                raise err(f"--set {key}", f"no stage or section named {head!r}{_suggest(head, names + list(TOP_KEYS))}")
            if len(parts) >= 2 and parts[1] in STAGE_KEYS and (len(parts) > 2 or parts[1] in ("kind", "depends_on")):
                path = ["stages", *parts]
            else:
                path = ["stages", head, "args", *parts[1:]]
        node = raw
        for p in path[:-1]:
            nxt = node.get(p) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise err(f"--set {key}", f"{p} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return raw


def read_yaml(path: str | os.PathLike,
              shape: str = "the file must be a YAML mapping (name, cluster, defaults, stages)") -> dict:
    """A YAML file that must hold a mapping; a missing file, bad YAML or another shape is a
    ConfigError naming the file (and the line, for bad YAML)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {shape}")
    return data


def load_pipeline(path: str | os.PathLike, overrides: list[str] | None = None) -> Pipeline:
    source = str(path)
    raw = apply_overrides(read_yaml(path), overrides or [], source)
    return parse_pipeline(raw, source)


def parse_pipeline(raw: dict, source: str, check_args: bool = True) -> Pipeline:
    """Validate everything and build the Pipeline. check_args imports each kind's config class."""
    err = SpecError(source)
    _check_keys(err, "", raw, TOP_KEYS)
    from jobs.tracking import check_spec     # experiment trackers (jobs/tracking.py); imports no tracker
    check_spec(source, raw.get("tracking"))
    for k in ("name", "description", "results_dir"):
        if k in raw and not isinstance(raw[k], str):
            raise err(k, f"expected str, got {type(raw[k]).__name__} {raw[k]!r}")
    cluster_raw = raw.get("cluster") or {}
    if not isinstance(cluster_raw, dict):
        raise err("cluster", "expected a mapping")
    _check_fields(err, "cluster", cluster_raw, Cluster)
    _check_slurm_values(err, "cluster", cluster_raw)
    for k in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min"):
        if k in cluster_raw:
            _check_resources(err, "cluster", {k: cluster_raw[k]})
    cluster = Cluster(**cluster_raw)

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise err("defaults", "expected a mapping")
    _check_keys(err, "defaults", defaults, DEFAULTS_KEYS)
    default_args = defaults.get("args") or {}
    default_res = defaults.get("resources") or {}
    for k, v in (("defaults.args", default_args), ("defaults.resources", default_res)):
        if not isinstance(v, dict):
            raise err(k, "expected a mapping")
    _check_resources(err, "defaults.resources", default_res)

    stages_raw = raw.get("stages")
    if not stages_raw:
        raise err("stages", "missing or empty: a pipeline needs at least one stage")
    if not isinstance(stages_raw, dict):
        raise err("stages", "expected a mapping of stage name -> stage")
    stages: dict[str, Stage] = {}
    own_args: dict[str, set] = {}   # keys set in the stage's own args (not through defaults.args)
    for name, body in stages_raw.items():
        where = f"stages.{name}" if str(name).isprintable() else f"stages.{name!r}"  # the error stays one line
        if not isinstance(name, str) or not STAGE_NAME_RE.fullmatch(name):
            raise err(where, "stage names are letters, digits, _ and -, starting with a letter")
        if not isinstance(body, dict):
            raise err(where, "expected a mapping (kind, depends_on, resources, args, variants)")
        _check_keys(err, where, body, STAGE_KEYS)
        kind = body.get("kind")
        if kind is None:
            raise err(f"{where}.kind", "missing")
        if kind not in KINDS:
            raise err(f"{where}.kind", f"unknown stage kind {kind!r}{_suggest(str(kind), KINDS)}; known: {', '.join(KINDS)}")
        deps = body.get("depends_on") or []
        if isinstance(deps, str):
            deps = [deps]
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise err(f"{where}.depends_on", "expected a list of stage names")
        res_raw = body.get("resources") or {}
        if not isinstance(res_raw, dict):
            raise err(f"{where}.resources", "expected a mapping")
        _check_resources(err, f"{where}.resources", res_raw)
        res = {k: getattr(cluster, k) for k in ("nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min")}
        res.update(default_res)
        res.update(res_raw)
        resources = Resources(**res)
        if resources.gpus_per_node and resources.tasks_per_node > resources.gpus_per_node:
            raise err(f"{where}.resources.tasks_per_node",
                      f"{resources.tasks_per_node} tasks per node with gpus_per_node {resources.gpus_per_node}: ranks "
                      f"would share a GPU (NCCL fails); one task per GPU")
        if resources.signal_delay_s >= resources.time_min * 60:
            raise err(f"{where}.resources.signal_delay_s",
                      f"{resources.signal_delay_s} s must be shorter than time_min ({resources.time_min} min)")
        args_raw = body.get("args") or {}
        if not isinstance(args_raw, dict):
            raise err(f"{where}.args", "expected a mapping")
        variants_raw = body.get("variants") or []
        if not isinstance(variants_raw, list):
            raise err(f"{where}.variants", "expected a list of {name, args}")
        variants = []
        for i, v in enumerate(variants_raw):
            vwhere = f"{where}.variants[{i}]"
            if not isinstance(v, dict):
                raise err(vwhere, "expected a mapping {name, args}")
            _check_keys(err, vwhere, v, VARIANT_KEYS)
            if not isinstance(v.get("name"), str) or not v["name"]:
                raise err(f"{vwhere}.name", "missing (a short label such as baseline or auto)")
            if not VARIANT_NAME_RE.fullmatch(v["name"]) or ".." in v["name"]:
                raise err(f"{vwhere}.name", f"{v['name']!r}: variant names are letters, digits, _, - and . "
                                            "(no '/' or '..'), starting with a letter or digit")
            if not isinstance(v.get("args") or {}, dict):
                raise err(f"{vwhere}.args", "expected a mapping")
            variants.append(Variant(name=v["name"], args=dict(v.get("args") or {})))
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise err(f"{where}.variants", f"variant names must be unique: {names}")
        # defaults.args only reach the stages whose config has the key (a depth for training
        # stages need not upset the probe), but a stage's own args must all be known.
        stages[name] = Stage(name=name, kind=kind, depends_on=list(deps), resources=resources,
                             args=dict(args_raw), variants=variants)
        own_args[name] = set(args_raw)

    # dependencies: known names, no cycles; order stages topologically (stable)
    for s in stages.values():
        for d in s.depends_on:
            if d not in stages:
                raise err(f"stages.{s.name}.depends_on", f"unknown stage {d!r}{_suggest(d, stages)}")
            if d == s.name:
                raise err(f"stages.{s.name}.depends_on", "a stage cannot depend on itself")
    order = _topological_order(err, stages)

    if check_args:
        for s in stages.values():
            try:
                cls = config_class(s.kind)
            except ImportError as e:
                raise err(f"stages.{s.name}.kind", f"recipe for kind {s.kind!r} cannot be imported ({e})") from None
            fields = {f.name for f in dataclasses.fields(cls)}
            merged = {k: v for k, v in default_args.items() if k in fields}
            _check_fields(err, "defaults.args", merged, cls, skip=FILLED_BY_JOBS)
            _check_fields(err, f"stages.{s.name}.args", s.args, cls, skip=FILLED_BY_JOBS)
            for i, v in enumerate(s.variants):
                _check_fields(err, f"stages.{s.name}.variants[{i}].args", v.args, cls, skip=FILLED_BY_JOBS)
            merged.update(s.args)
            s.args = merged
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       and f.name not in merged and f.name not in FILLED_BY_JOBS
                       and not all(f.name in v.args for v in s.variants or [Variant("", {})])]
            if missing:
                raise err(f"stages.{s.name}.args.{missing[0]}", "missing required key")
            check = getattr(cls, "check_args", None)   # a recipe's own value checks (e.g. chat_eval's task names)
            for key, message in (check(checked_args(s, merged, fields)) if check is not None else []):
                raise err(f"stages.{s.name}.args.{key}", message)
        known = {f.name for s in stages.values() for f in dataclasses.fields(config_class(s.kind))}
        for k in default_args:
            if k not in known:
                raise err(f"defaults.args.{k}", f"unknown key in every stage's kind{_suggest(str(k), known)}")
        resolve_data_source(err, stages)
        check_data_files(err, stages)
    else:
        resolve_data_source(err, stages)    # a run folder's resolved.yaml, read on the node
    for s in stages.values():
        init_from = s.args.get("init_from")
        if isinstance(init_from, str) and init_from in stages and init_from not in ancestors(stages, s.name):
            raise err(f"stages.{s.name}.args.init_from",
                      f"stage {init_from!r} must be in depends_on (directly or through another stage)")

    for s in stages.values():    # checked at submit; a run folder's re-read skips it (it imports torch)
        if check_args and s.kind == "probe" and s.args.get("serves"):
            _check_serves(err, stages, s, own_args[s.name])

    ordered = {n: stages[n] for n in order}
    resolved = copy.deepcopy(raw)
    resolved.setdefault("name", Path(source).stem)
    if not PIPELINE_NAME_RE.fullmatch(resolved["name"]) or ".." in resolved["name"]:
        rule = "letters, digits, _, - and ., starting with a letter or digit"
        if "name" in raw:
            raise err("name", f"{resolved['name']!r}: pipeline names are {rule}")
        raise err("name", f"missing, and the file name {resolved['name']!r} is not a pipeline name ({rule}): set name")
    return Pipeline(name=resolved["name"], description=raw.get("description", ""),
                    results_dir=raw.get("results_dir", ""), cluster=cluster, stages=ordered,
                    source=source, raw=resolved, default_args=dict(default_args))


def checked_args(stage: Stage, args: dict, fields: set) -> dict:
    """The args a recipe's check_args sees: device_type "" (auto) is "cuda" for a stage given GPUs, so
    a value that cannot run there (inference_bench precision int8) is refused before submission."""
    if "device_type" in fields and not args.get("device_type") and stage.resources.gpus_per_node:
        return dict(args, device_type="cuda")
    return args


def _check_serves(err: SpecError, stages: dict[str, Stage], probe: Stage, own: set) -> None:
    """A probe's `serves` names a base or mid training stage that runs after it; the probe then takes
    its shape from that stage (jobs.stages.probe_args), so it may not set those keys itself."""
    from nanochat.recipes.probe import SERVED_KEYS
    where = f"stages.{probe.name}.args.serves"
    served = probe.args["serves"]
    if not isinstance(served, str) or served not in stages:
        raise err(where, f"unknown stage {served!r}{_suggest(str(served), stages)}")
    if stages[served].kind not in ("base_train", "mid_train"):
        raise err(where, f"stage {served!r} is a {stages[served].kind} stage; a probe serves base_train or mid_train")
    if probe.name not in ancestors(stages, served):
        raise err(where, f"stage {served!r} must depend on {probe.name!r} (directly or through another stage)")
    for key in SERVED_KEYS:
        if key in own:
            raise err(f"stages.{probe.name}.args.{key}", f"set by serves: {served} (the probe takes it from that stage); remove it")
    if "memory_budget_gb" in own:
        raise err(f"stages.{probe.name}.args.memory_budget_gb",
                  f"{served} probes under the default CPU budget; an entry made under another is never read by it")


def resolve_data_source(err: SpecError, stages: dict[str, Stage]) -> None:
    """A base_train stage's `data_source` may name a data stage before it: it then reads the
    pretraining set that stage fetches (so `--set data.pretraining=...` switches the corpus in one place)."""
    for s in stages.values():
        src = s.args.get("data_source")
        if s.kind != "base_train" or not isinstance(src, str) or src not in stages:
            continue
        where = f"stages.{s.name}.args.data_source"
        if stages[src].kind != "data" or not stages[src].args.get("pretraining"):
            raise err(where, f"stage {src!r} is not a data stage with a pretraining set")
        if src not in ancestors(stages, s.name):
            raise err(where, f"stage {src!r} must be in depends_on (directly or through another stage)")
        s.args["data_source"] = stages[src].args["pretraining"]


def check_data_files(err: SpecError, stages: dict[str, Stage]) -> None:
    """Every data file or folder a stage (or one of its variants) will read, checked now: the first
    problem is a ConfigError naming the key, the file and its 1-based line. Each path is read once."""
    checked: set[tuple[str, str]] = set()
    for s in stages.values():
        sides = [(f"stages.{s.name}.args", s.args)] + \
            [(f"stages.{s.name}.variants[{i}].args", {**s.args, **v.args}) for i, v in enumerate(s.variants)]
        for where, args in sides:
            for key, (module_name, func_name) in DATA_FILE_CHECKS.items():
                path = args.get(key)
                if not isinstance(path, str) or not path or (key, path) in checked or \
                        (key == "init_from" and path in stages):   # an earlier stage's checkpoints: not there yet
                    continue
                try:
                    getattr(importlib.import_module(module_name), func_name)(path)
                except ConfigError as e:
                    raise err(f"{where}.{key}", str(e)) from None
                except OSError as e:  # unreadable folder or file: still one line naming it
                    raise err(f"{where}.{key}", f"{e.filename or path}: cannot read ({e.strerror or e})") from None
                checked.add((key, path))


def _topological_order(err: SpecError, stages: dict[str, Stage]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, path: list[str]):
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise err(f"stages.{name}.depends_on", f"dependency cycle: {' -> '.join(cycle)}")
        state[name] = 1
        for d in stages[name].depends_on:
            visit(d, path + [name])
        state[name] = 2
        order.append(name)

    for n in stages:
        visit(n, [])
    return order


def ancestors(stages: dict[str, Stage], name: str) -> set[str]:
    seen: set[str] = set()
    todo = list(stages[name].depends_on)
    while todo:
        d = todo.pop()
        if d not in seen:
            seen.add(d)
            todo.extend(stages[d].depends_on)
    return seen


def dependants(pipeline: Pipeline, names: set[str]) -> set[str]:
    """The given stages and everything downstream of them."""
    out = set(names)
    changed = True
    while changed:
        changed = False
        for s in pipeline.stages.values():
            if s.name not in out and any(d in out for d in s.depends_on):
                out.add(s.name)
                changed = True
    return out


def resolve_pipeline_path(name: str | None) -> Path:
    """A path, or a bare name found in pipelines/ (smoke -> pipelines/smoke.yaml)."""
    if not name:
        return DEFAULT_PIPELINE
    p = Path(name)
    if p.exists() or p.suffix in (".yaml", ".yml") or "/" in name:
        return p
    return PIPELINES_DIR / f"{name}.yaml"
