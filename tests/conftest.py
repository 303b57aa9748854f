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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models on a 2-core machine shared by several test processes only stall on a second thread
    (steps 50x slower), and the processes a test starts inherit the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


import os
import shutil
import subprocess
from pathlib import Path

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
