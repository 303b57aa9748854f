"""File locks where flock(2) is missing (nanochat/locking.py). Every lock runs in real, separate
processes on real files. No filesystem on this machine lacks flock (ext4, tmpfs), so "missing" is
made in the child process by replacing fcntl.flock with one that fails as those filesystems fail
(ENOSYS: Lustre without -o flock; ENOLCK: NFS without a lock manager; EOPNOTSUPP: some FUSE);
the soft lock itself is also exercised with no replacement at all (NANOCHAT_LOCK=soft)."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

NO_FLOCK = """
import errno, fcntl
def _no_flock(fd, op, _errno={errno}):
    raise OSError(_errno, os.strerror(_errno))
fcntl.flock = _no_flock
"""


def child(code: str, no_flock_errno: int | None = None, env_extra=None, wait=True):
    prelude = "import os, sys, json, time\n" + (NO_FLOCK.format(errno=no_flock_errno) if no_flock_errno else "")
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    if "NANOCHAT_LOCK" not in (env_extra or {}):
        env.pop("NANOCHAT_LOCK", None)
    args = [sys.executable, "-c", prelude + textwrap.dedent(code)]
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


MISSING = [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP]


def test_the_real_call_sites_lock_where_flock_is_missing(tmp_path):
    """Before nanochat.locking, filelock's FileLock raised NotImplementedError (ENOSYS, filelock before 3.24)
    or the OSError itself (ENOLCK, EOPNOTSUPP, any filelock), and only Timeout was caught: the probe
    stage failed, and so did `submit`'s bookkeeping. One child (torch imports once) per errno in turn."""
    out = child(f"""
        import fcntl, errno
        from nanochat import locking
        from nanochat.training.batch_size.cache import write_cache, read_cache
        from jobs.submit import update_jobs
        for err in {MISSING!r}:
            def no_flock(fd, op, err=err):
                raise OSError(err, os.strerror(err))
            fcntl.flock = no_flock
            locking._kind_by_device.clear()          # a new process would probe afresh
            write_cache({str(tmp_path / 'cache')!r}, "k", {{"device_batch_size": err, "grad_accum": 2}})
            update_jobs({str(tmp_path)!r}, lambda d: d["stages"].update({{str(err): "RUNNING"}}))
            print(errno.errorcode[err], locking.lock_kind({str(tmp_path)!r}),
                  read_cache({str(tmp_path / 'cache')!r}, "k")["device_batch_size"] == err)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{errno.errorcode[e]} soft True" for e in MISSING]
    assert sorted(json.loads((tmp_path / "jobs.json").read_text())["stages"]) == sorted(map(str, MISSING))
    assert not (tmp_path / "jobs.json.lock").exists()       # a soft lock is gone once released
    assert not list(tmp_path.glob(".flock-probe-*"))         # the probe cleans up


def test_flock_where_it_works_and_a_bad_setting_is_one_line(tmp_path):
    out = child(f"""
        from nanochat.errors import ConfigError
        from nanochat.locking import file_lock
        from filelock import SoftFileLock
        print("soft" if isinstance(file_lock({str(tmp_path / 'x.lock')!r}), SoftFileLock) else "flock")
        os.environ["NANOCHAT_LOCK"] = "sometimes"
        try:
            file_lock({str(tmp_path / 'x.lock')!r})
        except ConfigError as e:
            print(e)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["flock", "NANOCHAT_LOCK='sometimes': expected one of auto, flock, soft"]


COUNTER = """
    from nanochat.locking import file_lock
    path = {path!r}
    for _ in range(20):
        with file_lock(path + ".lock", timeout=60):
            n = int(open(path).read() or 0)
            time.sleep(0.002)              # widen the read-modify-write window
            open(path, "w").write(str(n + 1))
"""


@pytest.mark.parametrize("how", ["no-flock", "forced-soft"])
def test_soft_locks_exclude_each_other_across_processes(tmp_path, how):
    counter = tmp_path / "counter"
    counter.write_text("0")
    kw = dict(no_flock_errno=errno.ENOSYS) if how == "no-flock" else dict(env_extra={"NANOCHAT_LOCK": "soft"})
    procs = [child(COUNTER.format(path=str(counter)), wait=False, **kw) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert counter.read_text() == "40"                       # no update lost


def test_a_soft_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    lock = str(tmp_path / "held.lock")
    holder = child(f"""
        from nanochat.locking import file_lock
        l = file_lock({lock!r}); l.acquire(); print("held", flush=True); time.sleep(600)
    """, no_flock_errno=errno.ENOSYS, wait=False)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)                      # dies holding it: the lock file stays
    holder.wait(timeout=30)
    assert Path(lock).exists()
    out = child(f"""
        from nanochat.locking import file_lock
        with file_lock({lock!r}, timeout=20):
            print("taken")
    """, no_flock_errno=errno.ENOSYS)
    # taken over, not waited out: the child's own timeout=20 would have failed it with an error
    assert out.returncode == 0 and out.stdout.strip() == "taken", out.stderr


OTHER_HOST = "import socket\nsocket.gethostname = lambda: 'n2'   # as if on another node of the cluster\n"


def test_a_soft_lock_left_by_a_dead_holder_on_another_host_is_taken_over(tmp_path):
    """Before, its lock file (pid and host of a node this one cannot probe) was waited on forever.
    Now its holder touches it while alive; untouched for the lease, it is taken over."""
    lock = str(tmp_path / "held.lock")
    env = {"NANOCHAT_LOCK": "soft", "NANOCHAT_LOCK_LEASE_S": "2"}
    holder = child(OTHER_HOST + f"""
from nanochat.locking import file_lock
l = file_lock({lock!r}); l.acquire(); print("held", flush=True); time.sleep(600)
""", env_extra=env, wait=False)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)          # the node died: nobody will ever remove its lock file
    holder.wait(timeout=30)
    assert "host=n2" in Path(lock).read_text()
    out = child(f"""
        from nanochat.locking import file_lock
        with file_lock({lock!r}):                # the default wait
            print("taken")
    """, env_extra=env)
    assert out.returncode == 0 and out.stdout.strip() == "taken", out.stderr


def test_a_lock_held_too_long_is_one_line_naming_the_file_and_holder(tmp_path):
    lock = str(tmp_path / "held.lock")
    env = {"NANOCHAT_LOCK": "soft", "NANOCHAT_LOCK_LEASE_S": "120"}
    holder = child(OTHER_HOST + f"""
from nanochat.locking import file_lock
l = file_lock({lock!r}); l.acquire(); print("held", flush=True); time.sleep(600)
""", env_extra=env, wait=False)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = child(f"""
            from filelock import Timeout
            from nanochat.locking import file_lock
            try:
                with file_lock({lock!r}):
                    print("taken")
            except Timeout as e:                 # an OSError too: a stage fails with this one line
                print(isinstance(e, OSError), e)
        """, env_extra={**env, "NANOCHAT_LOCK_TIMEOUT": "1"})
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert re.match(rf"True {re.escape(lock)}: still held after \d+ s by pid {holder.pid} on n2; ", line), line
    assert "NANOCHAT_LOCK_TIMEOUT" in line and "\n" not in line
