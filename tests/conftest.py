import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def fp32_muon(monkeypatch):
    """Muon's Newton-Schulz step in fp32 on the CPU. Tests that compare two mathematically equal
    splits of one optimizer step (micro-batches, OOM fallback) need it: bf16 rounding inside the
    orthogonalisation turns 1e-7 summation-order noise into 1e-3 differences, hiding what the test
    is about (a lost step or a wrong normalisation moves weights by ~1e-2)."""
    import nanochat.optim
    monkeypatch.setattr(nanochat.optim, "_NS_DTYPE_CPU", torch.float32)


def pytest_collection_modifyitems(config, items):
    """A test that needs the local Slurm (the local_slurm fixture, directly or through another
    fixture) is a `slurm` test whether or not it says so: `make test-fast` (-m "not slurm") leaves it out."""
    for item in items:
        if "local_slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models on a 2-core machine shared by several test processes only stall on a second thread
    (steps 50x slower), and the processes a test starts inherit the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parent.parent


def _slurm_usable() -> bool:
    """sinfo answers and sacct reaches accounting (slurmdbd + MariaDB)."""
    if not all(shutil.which(c) for c in ("sinfo", "sbatch", "sacct")):
        return False
    try:
        return all(subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
                   for cmd in (["sinfo", "-h"], ["sacct", "-n", "-X", "-S", "now-1minutes"]))
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def local_slurm():
    """The local Slurm with accounting, brought (back) up by sbatch/slurm_local.sh when it does not
    answer (`up` is idempotent and takes a fraction of a second when all is running). With CI=true
    a Slurm that cannot be brought up fails the test; elsewhere the test is skipped."""
    if not _slurm_usable():
        subprocess.run(["bash", str(REPO / "sbatch" / "slurm_local.sh"), "up"], capture_output=True, timeout=600)
    if not _slurm_usable():
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but the local Slurm with accounting is not up (bash sbatch/slurm_local.sh up)")
        pytest.skip("no local Slurm with accounting here: bash sbatch/slurm_local.sh up")


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One run of the embedded default pipeline (pipelines/smoke.yaml, cut short by helpers.SMOKE_SHORT)
    as a user without Slurm runs it: `python -m jobs submit --run-id smoke --json`, the auto executor,
    no Slurm commands on PATH. Shared by every test that only reads what it wrote (its output, rows,
    report, checkpoints, metrics): they live in tests/test_smoke_run.py, so that each xdist worker
    (one module at a time) does not make its own. A test that breaks, kills or resumes a run makes
    its own. Nothing is asserted here: each test asserts what it reads, so a failed run fails them
    with its output."""
    from helpers import SMOKE_SHORT, path_without_slurm
    root = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(root / "results"), NANOCHAT_BASE_DIR=str(root / "work"),
               PATH=path_without_slurm(root))
    cmd = [sys.executable, "-m", "jobs", "submit", "--run-id", "smoke", "--json"]
    out = subprocess.run(cmd + [a for kv in SMOKE_SHORT for a in ("--set", kv)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=1500)
    return SimpleNamespace(out=out, env=env, root=root, results=root / "results", run_dir=root / "results" / "smoke",
                           workdir=root / "work")
