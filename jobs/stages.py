"""
Stage entry points: what runs on the node (a Slurm job through submitit, or a local process through
`python -m jobs stage-run RUN_DIR STAGE`). One entry reads the run folder, builds the recipe's config
from the resolved spec, runs the recipe and always writes one result row per task, also on failure
(state FAILED, then the error is re-raised so Slurm and the local runner see the failure).

Preemption and time limits: Slurm sends USR2 `signal_delay_s` before the limit (sbatch --signal,
set through submitit). The handler only sets a flag; the recipe polls should_stop() after each
optimizer step, checkpoints and returns state PREEMPTED; rank 0 then requeues the job
(`scontrol requeue`), and the restarted job (SLURM_RESTART_COUNT + 1) resumes from the checkpoint.
Requeues are capped by resources.max_requeues.

Also here: the built-in `noop` stage kind, a stand-in that exercises all of that without a model.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

from jobs.slurm import requeue
from nanochat.errors import one_line


# -----------------------------------------------------------------------------
# The built-in noop kind

@dataclass
class NoopConfig:
    seconds: float = 0.0          # total time to spend (spread over the steps)
    fail: bool = False            # raise an error (to test failure handling)
    fail_times: int = 0           # fail the first N attempts of this stage (counted in out_dir): tests resume
    steps: int = 0                # "training" steps; each updates a small deterministic state
    checkpointable: bool = False  # save the state after every step and resume from it
    all_reduce: bool = False      # join torch.distributed (gloo) and all-reduce the ranks' ids
    base_dir: str = ""
    out_dir: str = ""
    init_from: str = ""
    device_type: str = ""


def _noop_step(weights: list[float], step: int) -> list[float]:
    # Arbitrary but exactly reproducible arithmetic: equal weights mean the same steps in the same order.
    return [w * 0.999 + math.sin(step * (i + 1)) * 1e-3 for i, w in enumerate(weights)]


def run_noop(cfg: NoopConfig, should_stop=None) -> dict:
    if cfg.fail:
        raise RuntimeError("noop stage asked to fail (args.fail: true)")
    out = Path(cfg.out_dir) if cfg.out_dir else None
    if cfg.fail_times and out is not None:
        from nanochat.files import atomic_write_json as _write
        attempts = (read_json(out / "attempts.json") or {"attempts": 0})["attempts"] + 1
        _write(out / "attempts.json", {"attempts": attempts})
        if attempts <= cfg.fail_times:
            raise RuntimeError(f"noop stage asked to fail its first {cfg.fail_times} attempt(s) (this is attempt {attempts})")
    ckpt = out / "checkpoints" / "noop_state.json" if out else None
    state = {"step": 0, "weights": [float(i) for i in range(8)]}
    resumed_from = None
    if cfg.checkpointable and ckpt is not None and ckpt.exists():
        state = json.loads(ckpt.read_text())
        resumed_from = state["step"]
    result: dict = {"kind": "noop", "steps": 0}
    if cfg.all_reduce:
        import torch
        import torch.distributed as dist
        from nanochat.distributed import compute_init
        info = compute_init("cpu")
        t = torch.tensor([float(info.rank + 1)])
        if info.ddp:
            dist.all_reduce(t)
        result.update(world_size=info.world_size, all_reduce_sum=float(t.item()))
        from nanochat.distributed import compute_cleanup
        compute_cleanup()
    from nanochat.files import atomic_write_json
    per_step = cfg.seconds / cfg.steps if cfg.steps else 0.0
    if not cfg.steps:
        time.sleep(cfg.seconds)
    while state["step"] < cfg.steps:
        time.sleep(per_step)
        state["weights"] = _noop_step(state["weights"], state["step"])
        state["step"] += 1
        result["steps"] += 1
        if cfg.checkpointable and ckpt is not None:
            atomic_write_json(ckpt, state)
        if should_stop is not None and should_stop() and state["step"] < cfg.steps:
            result.update(state="PREEMPTED", resumed_from_step=resumed_from, stopped_at_step=state["step"])
            return result
    if out is not None:
        atomic_write_json(out / "final.json", state)
    result.update(state="COMPLETED", resumed_from_step=resumed_from, final_step=state["step"])
    return result


# -----------------------------------------------------------------------------
# Run folder helpers shared with jobs.runs (kept here so a node needs only this module)

def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def marker_path(run_dir: Path, stage: str, task: int | None = None) -> Path:
    suffix = "" if task is None else f".{task}"
    return Path(run_dir) / "markers" / f"{stage}{suffix}.done"


def stage_out_dir(run: dict, stage: str) -> Path:
    return Path(run["workdir"]) / run["run_id"] / stage


def load_run_pipeline(run_dir: Path):
    from jobs.spec import parse_pipeline
    import yaml
    raw = yaml.safe_load((Path(run_dir) / "resolved.yaml").read_text())
    return parse_pipeline(raw, str(Path(run_dir) / "resolved.yaml"), check_args=False)


def build_config(run: dict, pipeline, stage_name: str, task: int | None):
    """The recipe's config object: merged args (+ the variant's), with the jobs-filled fields."""
    from jobs.spec import config_class
    stage = pipeline.stages[stage_name]
    cls = config_class(stage.kind)
    known = {f.name for f in fields(cls)}
    args = {k: v for k, v in pipeline.default_args.items() if k in known}   # defaults.args first
    args.update({k: v for k, v in stage.args.items() if k in known})
    variant = None
    if stage.variants:
        variant = stage.variants[task or 0]
        args.update(variant.args)
    init_from = args.get("init_from")
    if isinstance(init_from, str) and init_from in pipeline.stages:
        # a stage name means "that stage's checkpoints" (docs/CONTRACTS.md)
        args["init_from"] = str(stage_out_dir(run, init_from) / "checkpoints")
    if stage.kind == "probe":
        args.update(probe_args(run, pipeline, stage_name, args))
    out_dir = stage_out_dir(run, stage_name)
    if variant is not None:
        out_dir = out_dir / variant.name
    if "base_dir" in known:
        args["base_dir"] = run["workdir"]
    if "out_dir" in known:
        args["out_dir"] = str(out_dir)
    return cls(**args), variant


def served_world_size(run: dict, stage) -> int:
    """Ranks a training stage runs with: nodes x tasks_per_node under Slurm; one process locally."""
    if run.get("executor") == "local":
        return 1
    return stage.resources.nodes * stage.resources.tasks_per_node


def probe_args(run: dict, pipeline, probe_stage: str | None, args: dict) -> dict:
    """A probe stage's derived args. With `serves: STAGE`, every shape key (nanochat.recipes.probe.
    SERVED_KEYS) comes from that training stage's own config (its first variant with an automatic
    batch) and its world size, so the probe writes exactly the cache entry the stage will read.
    time_limit_s defaults to the probe stage's time limit, less the signal delay and a tenth."""
    from nanochat.recipes.probe import SERVED_KEYS
    out = {}
    served_name = args.get("serves")
    if served_name:
        served = pipeline.stages[served_name]
        task = None
        if served.variants:
            base = {**pipeline.default_args, **served.args}
            autos = [i for i, v in enumerate(served.variants) if int({**base, **v.args}.get("device_batch_size", 0) or 0) == 0]
            task = autos[0] if autos else 0
        served_cfg, _ = build_config(run, pipeline, served_name, task)
        for key in SERVED_KEYS:
            if hasattr(served_cfg, key):
                out[key] = getattr(served_cfg, key)
        out["world_size"] = served_world_size(run, served)
    if probe_stage is not None and not float(args.get("time_limit_s") or 0):
        res = pipeline.stages[probe_stage].resources
        out["time_limit_s"] = max(30.0, 0.9 * (res.time_min * 60 - res.signal_delay_s))
    return out


# -----------------------------------------------------------------------------
# Preemption: USR2 sets a flag the recipe reads through should_stop()

_stop_requested = False


def _on_usr2(signum, frame):
    global _stop_requested
    _stop_requested = True
    print(f"[stage] caught signal {signum}: will checkpoint at the next step and requeue", flush=True)


def should_stop() -> bool:
    return _stop_requested


def install_preemption_handler() -> None:
    # Replaces submitit's own USR2 handler (which would interrupt the step in progress):
    # we want the recipe to reach a step boundary and save a consistent checkpoint.
    signal.signal(signal.SIGUSR2, _on_usr2)


def _rank() -> int:
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _requeue_self() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    requeue(job)


# -----------------------------------------------------------------------------
# The entry point

def run_stage(run_dir: str | os.PathLike, stage_name: str, task: int | None = None) -> dict:
    """Run one stage (one task of it, for an array) on this machine. Returns the row written.
    Raises on failure after writing a FAILED row."""
    from jobs.rows import make_row, row_path, utc_now, write_row
    from nanochat.files import atomic_write_json
    run_dir = Path(run_dir).resolve()
    run = read_json(run_dir / "run.json")
    if run is None:
        from nanochat.errors import ConfigError
        raise ConfigError(f"{run_dir}: not a run folder (no run.json)")
    started_at, t0 = utc_now(), time.time()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    rank = _rank()
    base = dict(run_id=run["run_id"], stage=stage_name, git_commit=run.get("git_commit"),
                started_at=started_at, requeues=restarts)
    pipeline = kind = variant = cfg = None
    try:
        pipeline = load_run_pipeline(run_dir)
        if stage_name not in pipeline.stages:
            raise KeyError(f"no stage {stage_name!r} in {run_dir / 'resolved.yaml'}")
        stage = pipeline.stages[stage_name]
        kind = stage.kind
        if stage.variants and (task is None or not 0 <= task < len(stage.variants)):
            raise ValueError(f"stage {stage_name} is an array of {len(stage.variants)}: give a task index")
        cfg, variant = build_config(run, pipeline, stage_name, task)
        if kind != "data":
            # compute nodes often have no internet: only the data stage may reach the hub
            os.environ["HF_HUB_OFFLINE"] = "1"
        if "SLURM_JOB_ID" in os.environ:
            install_preemption_handler()
        base["cpu_binding"] = check_cpu_binding()
        if kind != "noop":   # a noop stage does no tensor work: it need not import torch (seconds a process)
            _limit_threads(base["cpu_binding"])
        module = importlib.import_module(__name__ if kind == "noop" else _module_of(kind))
        recipe = run_noop if kind == "noop" else module.run
        print(f"[stage] {run['run_id']}/{stage_name}{'' if task is None else f'[{task}]'} kind={kind} "
              f"rank={rank} restarts={restarts}", flush=True)
        sampler = _start_gpu_sampler(kind, cfg, rank)
        try:
            result = recipe(cfg, should_stop=should_stop)
        finally:
            base["gpu_util_mean"] = sampler.stop() if sampler is not None else None
    except BaseException as e:
        if rank == 0:
            _collect_metrics(run_dir, stage_name, variant, cfg)
            row = make_row(**base, kind=kind, variant=variant.name if variant else None, state="FAILED",
                           error=one_line(e), wall_time_s=time.time() - t0)
            try:
                write_row(run_dir, row)
            except OSError as w:   # a full disk: the stage's own error still goes up, not this one
                print(f"[stage] could not write the FAILED row: {w}", file=sys.stderr, flush=True)
            _track(pipeline, run, run_dir, stage_name, variant, cfg, [row])
        traceback.print_exc()
        raise

    results = result if isinstance(result, list) else [result or {}]
    preempted = any((r or {}).get("state") == "PREEMPTED" for r in results)
    rows, written = [], []
    if rank == 0:
        _collect_metrics(run_dir, stage_name, variant, cfg)
        for i, r in enumerate(results):
            r = dict(r or {})
            r.setdefault("state", "COMPLETED")
            fields_ = {**base, "kind": kind, "variant": variant.name if variant else None, **r}
            fields_.setdefault("wall_time_s", time.time() - t0)
            row = make_row(**fields_)
            if len(results) > 1 and not (variant or r.get("variant")):
                row["variant"] = str(i)
            if len(results) > 1:
                # one file per variant row: the row path is keyed by stage and job id
                row_stage = f"{stage_name}.{row['variant']}"
                written.append(row_path(run_dir, row_stage, row["job_id"]))
                atomic_write_json(written[-1], row)
            elif row["state"] == "PREEMPTED":
                # the requeued job keeps its id: keep this attempt's row beside the final one
                atomic_write_json(row_path(run_dir, stage_name, f"{row['job_id']}.attempt{restarts}"), row)
            else:
                written.append(write_row(run_dir, row))
            rows.append(row)
        _track(pipeline, run, run_dir, stage_name, variant, cfg, rows)
    if preempted:
        if rank == 0:
            limit = pipeline.stages[stage_name].resources.max_requeues
            if "SLURM_JOB_ID" not in os.environ:
                raise RuntimeError("stage stopped early (PREEMPTED) outside Slurm: run `resume` to finish it")
            if restarts >= limit:
                raise RuntimeError(f"stage preempted/timed out after {restarts} requeues (max_requeues={limit})")
            print(f"[stage] checkpoint saved; requeueing (restart {restarts + 1} of at most {limit})", flush=True)
            _requeue_self()
            # Like submitit after its own requeue: leave without a result (SystemExit passes through
            # submitit's error handling, so no result pickle says "finished"); Slurm restarts the job.
            sys.exit(-1)
        # other ranks: rank 0 requeues the whole job, which stops this process
        time.sleep(300)
        sys.exit(-1)
    if rank == 0:
        marker = marker_path(run_dir, stage_name, task if stage_name and pipeline.stages[stage_name].variants else None)
        try:
            atomic_write_json(marker, {"stage": stage_name, "task": task,
                                       "finished_at": rows[-1]["finished_at"] if rows else None,
                                       "job_id": rows[-1]["job_id"] if rows else None})
        except OSError as e:
            # Without its marker the stage did not complete (status, resume): its rows must not say so.
            _unsay_completed(written, rows, f"completion marker not written: {e}")
            raise
    return rows[-1] if rows else {}


def _start_gpu_sampler(kind: str, cfg, rank: int):
    """NVML sampling of this rank's GPU while a model stage runs on CUDA (rank 0 writes the row, so
    rank 0 samples); None on a CPU, without NVML, and for noop: the row's gpu_util_mean stays empty."""
    if kind == "noop" or rank != 0:
        return None
    import torch
    from nanochat import gpu_monitor
    device_type = getattr(cfg, "device_type", "") or ("cuda" if torch.cuda.is_available() else "cpu")
    sampler, why = gpu_monitor.start_gpu_sampler(device_type)
    if sampler is None and device_type == "cuda":
        print(f"[stage] gpu_util_mean not measured: {why}", flush=True)
    return sampler


def _unsay_completed(paths: list[Path], rows: list[dict], error: str) -> None:
    """Rewrite the stage's COMPLETED rows as FAILED; where even that cannot be written (the disk
    that refused the marker), remove them: removing needs no space."""
    from nanochat.files import atomic_write_json
    for path, row in zip(paths, rows):
        try:
            atomic_write_json(path, {**row, "state": "FAILED", "error": error})
        except OSError:
            try:
                path.unlink()
            except OSError:
                pass


def _track(pipeline, run: dict, run_dir: Path, stage_name: str, variant, cfg, rows: list[dict]) -> None:
    """The spec's experiment trackers get this stage's metrics and rows (jobs/tracking.py; off by default)."""
    if pipeline is not None and pipeline.raw.get("tracking"):
        from jobs.tracking import send
        out_dir = getattr(cfg, "out_dir", "") if cfg is not None else ""
        send(pipeline.raw["tracking"], run, Path(run_dir), stage_name if variant is None else f"{stage_name}.{variant.name}",
             Path(out_dir) / "metrics.csv" if out_dir else None, rows)


def _collect_metrics(run_dir: Path, stage_name: str, variant, cfg) -> None:
    """Copy the stage's metrics CSV (written in its out_dir, on the work filesystem) into
    results/<run>/metrics/<stage>[.<variant>].csv, so a run's results folder is self-contained."""
    out_dir = getattr(cfg, "out_dir", "") if cfg is not None else ""
    src = Path(out_dir) / "metrics.csv" if out_dir else None
    if src is None or not src.is_file():
        return
    from nanochat.files import atomic_write_bytes
    name = stage_name if variant is None else f"{stage_name}.{variant.name}"
    atomic_write_bytes(run_dir / "metrics" / f"{name}.csv", src.read_bytes())


def check_cpu_binding(env=None, affinity: set | None = None) -> dict:
    """The CPUs this task may run on (its affinity) against the cpus_per_task Slurm allotted it. Fewer
    means srun bound the task to fewer cores than asked (srun without --cpus-per-task on Slurm 22.05+):
    said on stderr, and the threads are then set to the CPUs there are. Goes into the row."""
    env = os.environ if env is None else env
    affinity = os.sched_getaffinity(0) if affinity is None else affinity
    wanted = env.get("SLURM_CPUS_PER_TASK", "")
    out = {"cpus_per_task": int(wanted) if wanted.isdigit() else None, "cpus_bound": len(affinity),
           "srun_cpus_per_task": env.get("SRUN_CPUS_PER_TASK")}
    if out["cpus_per_task"] and len(affinity) < out["cpus_per_task"]:
        print(f"[stage] warning: this task is bound to {len(affinity)} CPU(s) but cpus_per_task is "
              f"{out['cpus_per_task']} (srun without --cpus-per-task / SRUN_CPUS_PER_TASK?): "
              f"running {len(affinity)} thread(s)", file=sys.stderr, flush=True)
    return out


def _limit_threads(binding: dict) -> None:
    # torch starts one thread per core of the machine, not of the allocation; on a shared node (or a
    # loaded laptop) oversubscribed OpenMP threads spin against each other and a tiny model ran >10x
    # slower here. Use what Slurm allotted and the task is bound to (or what the local runner chose)
    # unless the user said otherwise.
    if os.environ.get("OMP_NUM_THREADS"):
        return
    n = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("NANOCHAT_STAGE_THREADS")
    if n and n.isdigit() and int(n) > 0:
        import torch
        torch.set_num_threads(min(int(n), binding["cpus_bound"]))


def _module_of(kind: str) -> str:
    from jobs.spec import KINDS
    return KINDS[kind][0]


class StageEntry:
    """The callable submitit pickles and runs on the node (a plain object: picklable, no state)."""

    def __init__(self, run_dir: str, stage: str):
        self.run_dir = str(run_dir)
        self.stage = stage

    def __call__(self, task: int | None = None) -> dict:
        return run_stage(self.run_dir, self.stage, task)


def main_stage_run(run_dir: str, stage: str, task: int | None) -> int:
    """`python -m jobs stage-run RUN_DIR STAGE [--task I]` (what the local runner starts)."""
    try:
        run_stage(run_dir, stage, task)
    except Exception as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)   # the log's last line: the console shows it
        return 1
    return 0
