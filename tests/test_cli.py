"""The command line (jobs/cli.py): dispatch, exit codes, one-line errors, --json. Uses noop stages."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs import cli, runs, spec

REPO = Path(__file__).resolve().parent.parent

NOOP = {
    "name": "clitest",
    "stages": {
        "a": {"kind": "noop"},
        "b": {"kind": "noop", "depends_on": ["a"], "args": {"steps": 2}},
    },
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "work"))
    return tmp_path


def run_cli(*argv, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "jobs", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("submit", "status", "cancel", "resume", "report", "probe", "bench", "chat"):
        assert command in out.stdout


@pytest.mark.slow
def test_bench_help_shows_each_benchmark_s_text():
    # a "%" in a help text is argparse formatting: unescaped, it printed the action's dict
    out = run_cli("bench", "--help")
    assert out.returncode == 0
    assert "85%" in out.stdout and "option_strings" not in out.stdout


def test_bad_spec_is_exit_2_with_one_line_naming_file_and_key(env):
    bad = dict(NOOP, stages={"a": {"kind": "noop", "args": {"secnds": 1}}})
    path = env / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = run_cli("submit", str(path), "--executor", "local")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"error: {path}: stages.a.args.secnds: unknown key (did you mean seconds?)"]
    assert not (env / "results").exists()     # nothing was created, nothing ran


def test_a_renamed_stage_key_is_exit_2_naming_the_new_key(env):
    # sft's max_seq_len became seq_len (one name per quantity): an old spec is refused, never half-read
    old = {"name": "renamed", "stages": {"sft": {"kind": "sft", "args": {"max_seq_len": 256}}}}
    path = env / "old.yaml"
    path.write_text(yaml.safe_dump(old))
    out = run_cli("submit", str(path), "--executor", "local")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {path}: stages.sft.args.max_seq_len: renamed: write seq_len instead"]
    assert not (env / "results").exists()


@pytest.mark.parametrize("argv,needle", [
    (["submit", "no/such/pipeline.yaml"], "no/such/pipeline.yaml: file not found"),
    (["submit", "NOOP", "--set", "b.stepz=3"], "stages.b.args.stepz: unknown key (did you mean steps?)"),
    (["submit", "NOOP", "--set", "b.resources.time_min=-5"], "stages.b.resources.time_min: -5 out of range"),
    (["submit", "NOOP", "--set", "q.x=1"], "--set q.x: no stage or section named 'q'"),
    (["submit", "NOOP", "--max-parallel", "0"], "--max-parallel 0: must be at least 1"),
    (["submit", "NOOP", "--set", "b.resources.tasks_per_node=4", "--set", "b.resources.gpus_per_node=2"],
     "stages.b.resources.tasks_per_node: 4 tasks per node with gpus_per_node 2: ranks would share a GPU"),
    (["status", "no-such-run"], "no-such-run: no such run"),
    (["cancel", "no-such-run"], "no-such-run: no such run"),
    (["resume", "no-such-run"], "no-such-run: no such run"),
])
def test_bad_input_exit_codes_in_process(env, capsys, argv, needle):
    path = env / "noop.yaml"
    path.write_text(yaml.safe_dump(NOOP))
    argv = [str(path) if a == "NOOP" else a for a in argv]
    if argv[0] == "submit":
        argv += ["--executor", "local"]
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.slow
def test_submit_local_json_status_and_resume_when_complete(env):
    path = env / "noop.yaml"
    path.write_text(yaml.safe_dump(NOOP))
    out = run_cli("submit", str(path), "--executor", "local", "--json", "--run-id", "r1")
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["run_id"] == "r1" and last["state"] == "COMPLETED" and last["executor"] == "local"
    assert last["stages"] == {"a": "COMPLETED", "b": "COMPLETED"}

    out = run_cli("status", "r1", "--json")
    assert out.returncode == 0
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert {n: s["state"] for n, s in status["stages"].items()} == {"a": "COMPLETED", "b": "COMPLETED"}
    assert all(s["job_id"].startswith("local:") and Path(s["log"]).exists() for s in status["stages"].values())

    out = run_cli("resume", "r1", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout.strip().splitlines()[-1])["resubmitted"] == []

    out = run_cli("submit", str(path), "--executor", "local", "--run-id", "r1")   # the id is taken
    assert out.returncode == 2 and "already exists" in out.stderr


def test_slurm_executor_without_slurm_is_bad_input(env, capsys, monkeypatch):
    path = env / "noop.yaml"
    path.write_text(yaml.safe_dump(NOOP))
    monkeypatch.setenv("PATH", str(env))        # no sbatch/sinfo on PATH
    rc = cli.main(["submit", str(path), "--executor", "slurm"])
    assert rc == 2
    assert "--executor slurm: no Slurm here" in capsys.readouterr().err


@pytest.mark.parametrize("argv,code,needle", [
    (["status", "no-such-run", "--json"], 2, "no-such-run: no such run"),
    (["resume", "no-such-run", "--json"], 2, "no-such-run: no such run"),
    (["submit", "NOOP", "--executor", "local", "--set", "b.stepz=3", "--json"], 2, "stages.b.args.stepz: unknown key"),
    (["submit", "NOOP", "--max-parallel", "many", "--json"], 2, "--max-parallel: invalid int value: 'many'"),
    (["report", "no-such-run", "--json"], 2, "no-such-run"),
])
def test_json_failures_end_with_an_error_object(env, capsys, argv, code, needle):
    """With --json a failing command's last stdout line is {"error": ..., "exit_code": ...}, and
    stderr has the same error as one line (argparse's usage errors included)."""
    path = env / "noop.yaml"
    path.write_text(yaml.safe_dump(NOOP))
    rc = cli.main([str(path) if a == "NOOP" else a for a in argv])
    out, err = capsys.readouterr()
    assert rc == code
    last = json.loads(out.strip().splitlines()[-1])
    assert last["exit_code"] == code and needle in last["error"]
    assert err.strip().splitlines() == [f"error: {last['error']}"]


@pytest.mark.slow
def test_a_failed_stage_shows_its_error_and_status_exits_1(env):
    path = env / "noop.yaml"
    path.write_text(yaml.safe_dump(NOOP))
    out = run_cli("submit", str(path), "--executor", "local", "--json", "--run-id", "bad", "--set", "b.fail=true")
    assert out.returncode == 1
    why = "RuntimeError: noop stage asked to fail (args.fail: true)"
    assert f"b: FAILED (exit 1: {why}; log " in out.stdout           # the driver's progress line
    assert f"  b FAILED: {why}" in out.stdout                         # under the status table
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["exit_code"] == 1 and last["error"] == f"stage b FAILED: {why}"

    out = run_cli("status", "bad", "--json")
    assert out.returncode == 1                                        # the run ended FAILED
    status = json.loads(out.stdout.strip().splitlines()[-1])
    assert status["state"] == "FAILED" and status["stages"]["b"]["error"] == why and status["exit_code"] == 1
    assert f"  b FAILED: {why}" in out.stdout
    assert "error" not in status["stages"]["a"]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function (`from jobs import x` -> jobs.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_the_command_line_imports_the_commands():
    """jobs/cli.py reaches each command module by name, when its command runs; no other part of jobs/
    (spec, runs, submit, the report, ...) imports jobs.cli or jobs.commands, so a library part never
    drags the command line in and the two never import each other."""
    parts = [p for p in (REPO / "jobs").rglob("*.py")
             if "commands" not in p.relative_to(REPO / "jobs").parts and p.name not in ("cli.py", "__main__.py")]
    assert len(parts) > 20
    for path in parts:
        bad = sorted(m for m in _imported_modules(path) if m == "jobs.cli" or m.startswith("jobs.commands"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def _imported_by(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -X importtime -m jobs ARGV` and every module it imported (importtime's stderr lines)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "jobs", *argv], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    return out, {line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


def test_help_and_status_do_not_import_torch(env):
    """--help and `status RUN` answer in a fraction of a second: neither imports torch (a few seconds), even
    for a run whose stages are training kinds (status reads their spec without checking args against the
    recipes' config classes)."""
    pipeline = spec.load_pipeline(spec.resolve_pipeline_path("smoke"))
    runs.create_run(pipeline, "notorch", "local", [])
    out, imported = _imported_by("--help")
    assert out.returncode == 0 and "jobs.cli" in imported and "torch" not in imported
    # a run created but never started: status says so (exit 1: the run has no driver, so it counts as FAILED)
    out, imported = _imported_by("status", "notorch", "--json")
    assert json.loads(out.stdout.strip().splitlines()[-1])["stages"]["base_train"]["state"] == "NOT_SUBMITTED"
    assert "jobs.runs" in imported and "torch" not in imported

