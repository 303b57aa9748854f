"""
File locks for what processes and nodes share: jobs.json, batch-size cache entries, prepared data
and tokenizers. This is the one place that decides which kind of lock a folder gets:

- "flock" (filelock.FileLock) where the filesystem implements flock(2): the kernel releases it
  when its holder dies, however it dies.
- "soft" (filelock.SoftFileLease) where it does not: some Lustre mounts (mounted without -o flock),
  NFS without a lock manager, some FUSE filesystems answer flock with ENOSYS, ENOLCK or EOPNOTSUPP,
  and filelock then raises NotImplementedError (ENOSYS, before 3.24) or the OSError itself instead of locking. A soft lock
  is the lock file itself, created exclusively and holding its holder's pid and host, which a
  thread of the holder touches every LEASE_S / 3 s. A lock file left by a process that died on the
  same host is taken over at once; one left by a holder on another host (a dead node) once it has
  not been touched for LEASE_S (every contender must use the same LEASE_S: filelock refuses
  otherwise).

Waiting is bounded by default (NANOCHAT_LOCK_TIMEOUT seconds, -1 = forever): a lock still held after
that raises LockTimeout, one line naming the file and its holder, instead of waiting forever on a
lock file nothing will ever remove.

Which one a folder gets is found once per filesystem (a probe flock on a scratch file in that
folder) and can be forced with NANOCHAT_LOCK=flock|soft, e.g. `soft` on a Lustre mounted with
-o localflock, where flock succeeds but does not exclude other nodes.
"""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
from pathlib import Path

from filelock import BaseFileLock, FileLock, SoftFileLease, Timeout

from nanochat.errors import ConfigError

LOCK_ENV = "NANOCHAT_LOCK"
TIMEOUT_ENV = "NANOCHAT_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0
LEASE_ENV = "NANOCHAT_LOCK_LEASE_S"
LEASE_S = 60.0
LOCK_KINDS = ("auto", "flock", "soft")
# flock(2) answers that say "not on this filesystem" (not "someone holds it")
FLOCK_MISSING_ERRNOS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP})

_kind_by_device: dict[int, str] = {}


def probe_flock(directory: str | os.PathLike) -> bool:
    """Does flock(2) work in this folder? Tried on a scratch file, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix=".flock-probe-", dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError as e:
        if e.errno in FLOCK_MISSING_ERRNOS:
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(name)


def lock_kind(directory: str | os.PathLike) -> str:
    """"flock" or "soft" for lock files in this (existing) folder."""
    forced = os.environ.get(LOCK_ENV, "auto").strip().lower() or "auto"
    if forced not in LOCK_KINDS:
        raise ConfigError(f"{LOCK_ENV}={forced!r}: expected one of {', '.join(LOCK_KINDS)}")
    if forced != "auto":
        return forced
    device = os.stat(directory).st_dev
    if device not in _kind_by_device:
        _kind_by_device[device] = "flock" if probe_flock(directory) else "soft"
    return _kind_by_device[device]


class LockTimeout(Timeout):
    """filelock.Timeout (so an OSError) whose message is one line naming the file and its holder."""

    def __init__(self, lock_file: str, message: str):
        super().__init__(lock_file)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _holder(path: str) -> str:
    """'pid N on HOST' from a soft lock's file (filelock's `key=value` lines), else what is known."""
    try:
        fields = dict(line.split("=", 1) for line in Path(path).read_text()[:1024].splitlines() if "=" in line)
    except OSError:
        return "another process"
    if "pid" in fields:
        return f"pid {fields['pid']} on {fields.get('host', '?')}"
    return "another process (flock)"


class _Bounded:
    """The lock's acquire, with filelock.Timeout turned into LockTimeout."""

    def acquire(self, timeout=None, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return super().acquire(timeout, *args, **kwargs)
        except LockTimeout:
            raise
        except Timeout:
            waited = time.monotonic() - t0
            raise LockTimeout(self.lock_file, f"{self.lock_file}: still held after {waited:.0f} s by "
                                              f"{_holder(self.lock_file)}; if that process is gone, remove the "
                                              f"file ({TIMEOUT_ENV} sets the wait)") from None


class _Flock(_Bounded, FileLock):
    pass


class _Lease(_Bounded, SoftFileLease):
    pass


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise ConfigError(f"{env}={text!r}: expected a number of seconds") from None


def file_lock(path: str | os.PathLike, timeout: float | None = None) -> BaseFileLock:
    """A lock on `path` (the lock file; its folder must exist) that works on this filesystem.
    Use it as filelock's locks: `with file_lock(p, timeout=60): ...`; LockTimeout (a
    filelock.Timeout) when still busy after `timeout` s (None: NANOCHAT_LOCK_TIMEOUT, default 3600)."""
    path = Path(path)
    try:
        kind = lock_kind(path.parent)
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot lock ({e.strerror})") from None
    if timeout is None:
        timeout = _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if kind == "flock":
        return _Flock(str(path), timeout=timeout)
    return _Lease(str(path), timeout=timeout, lease_duration=_seconds(LEASE_ENV, LEASE_S))
