"""`submit --dry-run` (jobs/dryrun.py): the scripts submitit would submit, put to the real local
Slurm's `sbatch --test-only`; nothing submitted, no run folder written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.spec import load_pipeline, resolve_pipeline_path

REPO = Path(__file__).resolve().parent.parent


def run_cli(tmp_path, *argv):
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    return subprocess.run([sys.executable, "-m", "jobs", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _jobs_named(prefix: str) -> list[str]:
    """Slurm's accounting of jobs whose name starts with prefix (submitit names them PIPELINE.STAGE)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", "now-60minutes", "--format=JobID,JobName"],
                         capture_output=True, text=True, timeout=30).stdout
    return [ln for ln in out.splitlines() if ln.split("|")[-1].startswith(prefix)]


def test_dry_run_of_smoke_on_the_local_slurm_fits_and_submits_nothing(tmp_path, local_slurm):
    # a pipeline name of its own, so Slurm's accounting can show that nothing of it was submitted
    pname = f"dry{os.getpid()}"
    spec = tmp_path / f"{pname}.yaml"
    spec.write_text((REPO / "pipelines" / "smoke.yaml").read_text().replace("name: smoke", f"name: {pname}"))
    out = run_cli(tmp_path, "submit", str(spec), "--dry-run", "--executor", "slurm", "--run-id", "dry1", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dry_run"] and {"probe", "base_train", "mid_train", "sft", "inference_bench"} <= set(result["stages"])
    train = result["stages"]["base_train"]
    # the script is submitit's own: its resources, the afterok dependency, the submitit entry point
    script = train["sbatch_script"]
    assert "#SBATCH --cpus-per-task=2" in script and "afterok:<probe>" in script
    assert "submitit.core._submit" in script and "#SBATCH --requeue" in script
    assert train["logs"].startswith(str(tmp_path / "work" / "dry1" / "submitit" / "base_train"))
    # the local Slurm's controller answered for every stage: the request fits its partition
    for name, stage in result["stages"].items():
        assert stage["test_only"]["ok"], (name, stage["test_only"])
        assert "to start at" in stage["test_only"]["answer"]
    assert "sbatch --test-only: fits" in out.stdout and f"data plan of {pname}" in out.stdout
    # nothing written, nothing submitted
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "work" / "dry1").exists()
    assert f"#SBATCH --job-name={pname}.base_train" in script
    assert not _jobs_named(pname + ".")


def test_dry_run_reports_a_request_the_partition_refuses(tmp_path, local_slurm):
    out = run_cli(tmp_path, "submit", "artemis-a100", "--dry-run", "--executor", "slurm", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stages"]["base_train"]["resources"]["gpus_per_node"] == 2
    assert "#SBATCH --gpus-per-node=2" in result["stages"]["base_train"]["sbatch_script"]
    # this Slurm has no partition "gpu" and no GPUs: sbatch --test-only says so, the dry run reports it
    answers = [s["test_only"] for s in result["stages"].values()]
    assert not any(a["ok"] for a in answers)
    assert any("partition" in a["answer"] or "gres" in a["answer"] for a in answers)
    n = len(result["stages"])   # every stage of the pipeline was asked, and every one refused
    assert n == len(load_pipeline(resolve_pipeline_path("artemis-a100")).stages)
    assert "REFUSED" in out.stdout and f"0 fit, {n} refused" in out.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_dry_run_without_slurm_prints_scripts_and_the_plan(tmp_path):
    out = run_cli(tmp_path, "submit", "smoke", "--dry-run", "--executor", "local")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --job-name=smoke.probe" in out.stdout
    assert str(tmp_path / "results" / "") in out.stdout and "logs/base_train.log" in out.stdout
    assert not (tmp_path / "results").exists()


def test_dry_run_of_a_bad_spec_is_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nstages:\n  a:\n    kind: noop\n    args: {secnds: 1}\n")
    out = run_cli(tmp_path, "submit", str(bad), "--dry-run")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "secnds" in out.stderr
    assert "sbatch script" not in out.stdout
