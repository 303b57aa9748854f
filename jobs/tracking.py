"""
Optional experiment tracking: each stage's metrics (its metrics CSV, step by step) and its result
rows go to the trackers the spec names. Off by default; a tracker's library is imported only when
the spec asks for it, on the node that runs the stage (rank 0, once the stage has written its rows).

    tracking:
      tensorboard: true                    # event files in results/<run>/tensorboard/<stage>[.<variant>]/
      wandb: {project: nanochat, mode: offline}   # offline: files under results/<run>/wandb/ (`wandb sync` later)
      mlflow: {uri: file:///shared/mlruns, experiment: nanochat}   # a file store or a tracking server

A tracker that fails (library missing, server down) prints one line on the stage's stderr and the
stage still completes: tracking is a copy of what results/<run>/ already holds, never the record.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from nanochat.errors import ConfigError

# tracker -> (what its value is, its keys, the key it cannot do without and an example of it)
TRACKERS = {
    "tensorboard": (bool, set(), None),
    "wandb": (dict, {"project", "entity", "mode"}, ("project", "")),
    "mlflow": (dict, {"uri", "experiment"}, ("uri", " (e.g. file:///shared/mlruns or http://host:5000)")),
}


def check_spec(source: str, tracking) -> None:
    """ConfigError (exit 2, at submit) for a malformed tracking section; no library is imported."""
    if tracking is None:
        return
    if not isinstance(tracking, dict):
        raise ConfigError(f"{source}: tracking: expected a mapping (tensorboard, wandb, mlflow)")
    for key, value in tracking.items():
        if key not in TRACKERS:
            raise ConfigError(f"{source}: tracking.{key}: unknown tracker (choose from {', '.join(TRACKERS)})")
        kind, keys, required = TRACKERS[key]
        if not isinstance(value, kind):
            raise ConfigError(f"{source}: tracking.{key}: expected {'true/false' if kind is bool else 'a mapping'}")
        if kind is bool:
            continue
        for k in value:
            if k not in keys:
                raise ConfigError(f"{source}: tracking.{key}.{k}: unknown key (choose from {', '.join(sorted(keys))})")
        if required and not value.get(required[0]):
            raise ConfigError(f"{source}: tracking.{key}.{required[0]}: required{required[1]}")
    if (tracking.get("wandb") or {}).get("mode", "offline") not in ("offline", "online", "disabled"):
        raise ConfigError(f"{source}: tracking.wandb.mode: offline, online or disabled (got {tracking['wandb']['mode']!r})")


def _metric_rows(path: Path | None) -> list[tuple[int, dict[str, float]]]:
    """(step, {column: value}) from a metrics CSV, numeric cells only."""
    if path is None or not path.is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if not (r.get("step") or "").isdigit():
                continue
            values = {}
            for k, v in r.items():
                if k == "step" or v in ("", None):
                    continue
                try:
                    values[k] = float(v)
                except ValueError:
                    pass
            out.append((int(r["step"]), values))
    return out


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def send(tracking: dict | None, run: dict, run_dir: Path, name: str, metrics_csv: Path | None, rows: list[dict]) -> None:
    """Send one stage's metrics and rows to each tracker the spec names. Never raises."""
    for tracker, conf in (tracking or {}).items():
        if not conf:
            continue
        try:
            SENDERS[tracker](conf, run, Path(run_dir), name, _metric_rows(metrics_csv), rows)
        except Exception as e:   # ImportError included: the stage's results stand without the tracker
            print(f"[tracking] {tracker}: not sent ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                  file=sys.stderr, flush=True)


def _tensorboard(conf, run, run_dir, name, metrics, rows):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard" / name))
    try:
        for step, values in metrics:
            for k, v in values.items():
                writer.add_scalar(f"metrics/{k}", v, step)
        for row in rows:
            step = int(row.get("steps") or 0)
            for k, v in _numbers(row).items():
                writer.add_scalar(f"row/{k}", v, step)
            writer.add_text("row", "```\n" + json.dumps(row, indent=1, sort_keys=True, default=str) + "\n```", step)
    finally:
        writer.close()


def _mlflow(conf, run, run_dir, name, metrics, rows):
    import os
    if conf["uri"].startswith("file:") or "://" not in conf["uri"]:
        # a file store on the shared filesystem is what a cluster without a tracking server has; MLflow 3
        # keeps it in "maintenance mode" and refuses it unless told (its documented opt-out)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    import mlflow
    client = mlflow.MlflowClient(tracking_uri=conf["uri"])
    experiment = conf.get("experiment") or run.get("pipeline") or "nanochat"
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"run_id": run["run_id"], "stage": name, "pipeline": run.get("pipeline", ""),
            "git_commit": run.get("git_commit") or ""}
    mrun = client.create_run(exp_id, run_name=f"{run['run_id']}/{name}", tags=tags)
    rid = mrun.info.run_id
    try:
        from mlflow.entities import Metric
        batch = [Metric(f"metrics.{k}", v, 0, step) for step, values in metrics for k, v in values.items()]
        for row in rows:
            batch += [Metric(f"row.{k}", v, 0, int(row.get("steps") or 0)) for k, v in _numbers(row).items()]
        for i in range(0, len(batch), 1000):    # the tracking API takes at most 1000 metrics a call
            client.log_batch(rid, metrics=batch[i:i + 1000])
        for i, row in enumerate(rows):
            client.log_dict(rid, row, f"rows/{name}.{i}.json")
        state = rows[-1].get("state") if rows else None
        client.set_terminated(rid, "FINISHED" if state in ("COMPLETED", "SKIPPED", None) else "FAILED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise


def _wandb(conf, run, run_dir, name, metrics, rows):
    import wandb
    folder = run_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    w = wandb.init(project=conf["project"], entity=conf.get("entity"), mode=conf.get("mode", "offline"),
                   dir=str(folder), name=f"{run['run_id']}/{name}", group=run["run_id"], job_type=name,
                   config={"run_id": run["run_id"], "pipeline": run.get("pipeline"), "stage": name}, reinit=True)
    try:
        for step, values in metrics:
            w.log({f"metrics/{k}": v for k, v in values.items()}, step=step)
        for row in rows:
            w.summary.update({f"row/{k}": v for k, v in _numbers(row).items()})
            w.summary["row/state"] = row.get("state")
    finally:
        w.finish()


SENDERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb}
