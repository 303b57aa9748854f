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
    from nanochat.files import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
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
    from nanochat import checkpoint
    from nanochat.training.batch_size import cache as batch_cache
    from nanochat.dataset import write_shard
    from nanochat.tokenizer import Tokenizer
    write_shard(tmp_path / "data" / "shard_00000.parquet", ["hello world"] * 4)
    Tokenizer.train(iter(["hello world, hello there"] * 50), 300).save(tmp_path / "tok")
    batch_cache.write_cache(tmp_path / "cache", "k" * 16, {"device_batch_size": 4, "grad_accum_steps": 1})
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


# -----------------------------------------------------------------------------
# A real full filesystem under the results folder: a small tmpfs (needs root to mount)

@pytest.fixture
def mount_tmpfs():
    """mount_tmpfs(path, kib) mounts a tmpfs of that size at path; unmounted after the test."""
    mounted = []

    def mount(path: Path, kib: int, remount: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        opts = f"{'remount,' if remount else ''}size={kib}k"
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs (a real full disk) needs root")
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        if not remount:
            mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path) -> Path:
    """Write into fs until it is full."""
    filler = fs / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def used_pages(fs: Path) -> int:
    st = os.statvfs(fs)
    return (st.f_blocks - st.f_bfree) * st.f_frsize // 4096


def cli(env, *argv):
    return subprocess.run([sys.executable, "-m", "jobs", *argv], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


def one_line_error(out, fs: Path) -> str:
    """The command ended as the contract says: exit 1, one line on stderr naming a file on fs, and
    with --json {"error", "exit_code"} as the last line of stdout."""
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "No space left on device" in err[0], err
    assert f"'{fs}/" in err[0], err                      # names the file it could not write
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["exit_code"] == 1 and last["error"] in err[0]
    return err[0]


@pytest.fixture
def spec_env(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(yaml.safe_dump(NOOP))
    env = dict(os.environ, NANOCHAT_RESULTS_DIR=str(tmp_path / "fs"), NANOCHAT_BASE_DIR=str(tmp_path / "work"))
    return tmp_path, spec, env


def test_full_disk_at_submit_is_one_line_naming_the_file(spec_env, mount_tmpfs):
    tmp, spec, env = spec_env
    fs = mount_tmpfs(tmp / "fs", 64)
    fill(fs)
    out = cli(env, "submit", str(spec), "--executor", "local", "--run-id", "full", "--json")
    err = one_line_error(out, fs)
    assert f"{fs}/full/" in err
    assert not (fs / "full").exists()                    # no half-made run folder left behind


def test_a_file_size_limit_at_submit_is_one_line_naming_the_file(spec_env):
    """The same without root: RLIMIT_FSIZE (EFBIG, "File too large") instead of a full tmpfs."""
    import resource
    import signal
    tmp, spec, env = spec_env

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))

    out = subprocess.run([sys.executable, "-m", "jobs", "submit", str(spec), "--executor", "local", "--run-id", "big",
                          "--json"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, preexec_fn=limit)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    err = out.stderr.strip().splitlines()
    assert err == [f"error: [Errno 27] File too large: '{tmp / 'fs' / 'big' / 'resolved.yaml'}'"]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"error": err[0][len("error: "):], "exit_code": 1}


@pytest.mark.slow   # ~40 s on 2 busy cores: two runs
def test_no_room_for_the_report_fails_the_command(spec_env, mount_tmpfs):
    """With room for the run but not its report, every stage completes and the command still fails:
    a run without its report is not done (it was a footnote on stderr, exit 0)."""
    tmp, spec, env = spec_env
    fs = mount_tmpfs(tmp / "fs", 4096)
    # measure what a run needs, with and without its report, then leave room for the run alone
    out = cli(env, "submit", str(spec), "--executor", "local", "--run-id", "measure")
    assert out.returncode == 0, out.stdout + out.stderr
    report_pages = sum(-(-p.stat().st_size // 4096) for p in (fs / "measure").iterdir()
                       if p.name in ("report.csv", "summary.md") or p.suffix == ".png")
    need = used_pages(fs) - report_pages + 1            # +1: a file being replaced exists twice for a moment
    assert report_pages >= 2
    subprocess.run(["rm", "-rf", str(fs / "measure")], check=True)
    mount_tmpfs(fs, 4 * need, remount=True)

    out = cli(env, "submit", str(spec), "--executor", "local", "--run-id", "full", "--json")
    err = one_line_error(out, fs)
    assert err.startswith("error: report not built: ") and f"{fs}/full/" in err
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["stages"] == {"a": "COMPLETED", "b": "COMPLETED"}     # the work itself is kept

    out = cli(env, "report", "full", "--json")           # the report command: same one line, exit 1
    one_line_error(out, fs)


@pytest.mark.slow
def test_a_marker_that_cannot_be_written_means_failed_everywhere(spec_env, mount_tmpfs):
    """The rows and the status agree: a stage whose completion marker hit a full disk is FAILED in
    its row, in jobs.json, in status and in the report, with the marker's path in its error."""
    tmp, spec, env = spec_env
    markers = mount_tmpfs(tmp / "fs" / "mk" / "markers", 16)    # the run folder's markers/ is a full disk
    filler = fill(markers)
    out = cli(env, "submit", str(spec), "--executor", "local", "--run-id", "mk", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    run_dir = tmp / "fs" / "mk"
    row_states = {json.loads(p.read_text())["stage"]: json.loads(p.read_text())["state"]
                  for p in (run_dir / "rows").glob("*.json")}
    assert row_states == {"a": "FAILED"}                 # was COMPLETED here while the run said FAILED
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["stages"] == {"a": "FAILED", "b": "CANCELLED"} and last["exit_code"] == 1
    assert f"completion marker not written: [Errno 28] No space left on device: '{markers}/a.done'" in last["error"]
    assert "a FAILED: " in out.stdout                   # the console shows the error, not only the log path
    status = json.loads(cli(env, "status", "mk", "--json").stdout.strip().splitlines()[-1])
    assert status["stages"]["a"]["state"] == "FAILED" and "a.done" in status["stages"]["a"]["error"]
    import pandas as pd
    report = pd.read_csv(run_dir / "report.csv")
    assert set(report.loc[report["stage"] == "a", "state"]) == {"FAILED"}

    filler.unlink()                                      # room again: resume finishes the run
    out = cli(env, "resume", "mk", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["state"] == "COMPLETED"


def stage_processes(run_dir: Path) -> list[int]:
    """Live processes running a stage of this run folder."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"stage-run" in cmd and str(run_dir).encode() in cmd and state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_disk_full_in_the_middle_of_a_local_run(spec_env, mount_tmpfs):
    """Room for the run folder but not for the driver's next jobs.json: the driver stops the stage
    it had just started, says which file in one line, and the run is not left stuck."""
    tmp, spec, env = spec_env
    fs = mount_tmpfs(tmp / "fs", 12)      # three pages: resolved.yaml, run.json, jobs.json, no fourth to replace it
    out = cli(env, "submit", str(spec), "--executor", "local", "--run-id", "mid", "--json")
    err = one_line_error(out, fs)
    assert f"'{fs}/mid/jobs.json'" in err
    assert not stage_processes(fs / "mid")                          # the stage it had started did not outlive it
    recs = json.loads((fs / "mid" / "jobs.json").read_text())
    assert recs["driver"]["pid"] and recs["driver"]["start"]
    out = cli(env, "status", "mid", "--json")
    assert out.returncode == 1                                     # not RUNNING forever
    assert {n: s["state"] for n, s in json.loads(out.stdout.strip().splitlines()[-1])["stages"].items()} \
        == {"a": "CANCELLED", "b": "CANCELLED"}
    mount_tmpfs(fs, 4096, remount=True)                            # room again: resume finishes the run
    out = cli(env, "resume", "mid", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["stages"] == {"a": "COMPLETED", "b": "COMPLETED"}
