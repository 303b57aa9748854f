"""Experiment tracking (jobs/tracking.py) on a real local run: TensorBoard event files read back,
an MLflow file store read back through MLflow's client. Skipped, saying why, where a library is
missing (neither is a dependency: `pip install tensorboard mlflow-skinny`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

TINY_TRAIN = {"kind": "base_train", "args": {
    "depth": 2, "vocab_size": 512, "seq_len": 64, "device_batch_size": 4, "total_batch_size": 512,
    "num_steps": 6, "eval_tokens": 2048, "log_every": 2, "eval_every": 0, "save_every": 0, "compile": "off"}}


def run_cli(tmp_path, *argv, timeout=900):
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    return subprocess.run([sys.executable, "-m", "jobs", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("tracking, key", [
    ({"mlflow": {}}, "tracking.mlflow.uri"), ({"wandb": {"project": "p", "mode": "cloudy"}}, "tracking.wandb.mode"),
    ({"tensorbord": True}, "tracking.tensorbord"), ({"wandb": {"projekt": "p"}}, "tracking.wandb.projekt")])
def test_a_bad_tracking_section_is_exit_2_before_anything_runs(tmp_path, tracking, key):
    spec = tmp_path / "t.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "tracking": tracking, "stages": {"a": {"kind": "noop"}}}))
    out = run_cli(tmp_path, "submit", str(spec), "--executor", "local")
    assert out.returncode == 2 and key in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_no_tracker_library_is_imported_unless_the_spec_asks(tmp_path):
    code = ("import sys; from jobs import spec, tracking; "
            "spec.parse_pipeline({'name': 't', 'tracking': {'tensorboard': True, 'mlflow': {'uri': 'file:///x'}, "
            "'wandb': {'project': 'p'}}, 'stages': {'a': {'kind': 'noop'}}}, 't.yaml'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'wandb', 'tensorboard')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_local_run_sends_metrics_and_rows_to_tensorboard_and_mlflow(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install mlflow-skinny)")
    store = tmp_path / "mlruns"
    spec = tmp_path / "tracked.yaml"
    spec.write_text(yaml.safe_dump({"name": "tracked", "stages": {"train": TINY_TRAIN},
                                    "tracking": {"tensorboard": True, "mlflow": {"uri": store.as_uri(), "experiment": "exp"}}}))
    out = run_cli(tmp_path, "submit", str(spec), "--executor", "local", "--run-id", "tr", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    log = (tmp_path / "results" / "tr" / "logs" / "train.log").read_text()
    assert "[tracking]" not in log, log          # no tracker failed
    metrics = [r for r in (tmp_path / "work" / "tr" / "train" / "metrics.csv").read_text().splitlines()[1:]]
    steps = [int(r.split(",")[0]) for r in metrics]
    row = json.loads(next((tmp_path / "results" / "tr" / "rows").glob("train__*.json")).read_text())

    # TensorBoard: the event files, read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "results" / "tr" / "tensorboard" / "train"))
    acc.Reload()
    loss = acc.Scalars("metrics/loss")
    assert [e.step for e in loss] == steps
    assert [e.value for e in acc.Scalars("row/tokens_per_s")] == [pytest.approx(row["tokens_per_s"])]

    # MLflow: the file store, read back through MLflow's client
    import mlflow
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("exp")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "tr/train" and mrun.info.status == "FINISHED"
    assert mrun.data.tags["stage"] == "train" and mrun.data.tags["run_id"] == "tr"
    history = client.get_metric_history(mrun.info.run_id, "metrics.loss")
    assert sorted(m.step for m in history) == steps
    assert mrun.data.metrics["row.tokens_per_s"] == pytest.approx(row["tokens_per_s"])
    saved = Path(client.download_artifacts(mrun.info.run_id, "rows/train.0.json", str(tmp_path / "dl")))
    assert json.loads(saved.read_text())["state"] == "COMPLETED"
