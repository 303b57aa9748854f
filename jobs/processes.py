"""
Processes of a local run: a process named for good (pid + kernel start time), a stage process that
follows its driver and turns SIGTERM/SIGHUP into Terminated (so it still writes its FAILED row), and
signalling a whole process group. jobs/submit.py (the local driver), jobs/runs.py (status, cancel) and
jobs/cli.py (stage-run) use them.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM or SIGHUP reached a driver or a stage process. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` in a recipe swallows it."""

    def __init__(self, signum: int, why: str = ""):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (f" ({why})" if why else ""))


def _driver_gone(driver: int, wait_s: float = 1.0) -> bool:
    """Whether this stage's driver died. PR_SET_PDEATHSIG fires when the *thread* that started us
    exits: while a killed driver's other threads are still being torn down, getppid() can name the
    driver for a few milliseconds more, so give the reparenting a moment before answering no."""
    deadline = time.monotonic() + wait_s
    while os.getppid() == driver:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def raise_terminated(signum, frame):
    driver = os.environ.get("NANOCHAT_DRIVER_PID", "")
    if driver.isdigit() and _driver_gone(int(driver)):      # a stage whose driver is gone
        raise Terminated(signum, f"its driver, pid {driver}, died")
    raise Terminated(signum)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (clock ticks after boot, /proc/PID/stat field 22),
    None when there is no such process or it has exited (a zombie). With the pid it names one
    process for good: a pid alone may be reused by an unrelated process after a crash."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else int(fields[19])


def process_alive(pid: int, start: int | None = None) -> bool:
    """Is `pid` still the process that started at `start` (where recorded)?"""
    if not Path("/proc/self/stat").exists():   # no procfs (macOS): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


def this_process() -> dict:
    return {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}


def follow_driver() -> None:
    """In a local stage process: end with the driver that started it (kill -9 of the driver must not
    leave the stage running with no parent) and, on SIGTERM or SIGHUP, raise Terminated so that the
    stage still writes its FAILED row. Linux: prctl(PR_SET_PDEATHSIG); elsewhere a thread polls
    the parent pid."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_terminated)
    driver = os.environ.get("NANOCHAT_DRIVER_PID", "")
    if not driver.isdigit():
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)        # 1 = PR_SET_PDEATHSIG
        watch = False
    except (OSError, AttributeError):
        watch = True
    if os.getppid() != int(driver):                      # the driver died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    elif watch:
        import threading
        def poll():
            while os.getppid() == int(driver):
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=poll, daemon=True, name="follow-driver").start()


def stop_own_group() -> None:
    """A stage process that leads its process group stops what it started (compile workers,
    the probe's budget child) before it exits (only when the driver started it in a session of its own)."""
    if os.environ.get("NANOCHAT_DRIVER_PID") and os.getpgrp() == os.getpid() == os.getsid(0):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        kill_group(os.getpid())


def kill_group(pid: int, sig=signal.SIGTERM) -> None:
    """Signal the process group `pid` leads; a group already gone (or not ours) is no error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
