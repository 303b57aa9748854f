"""
File locks for what processes and nodes share: jobs.json, batch-size cache entries, prepared data
and tokenizers. This is the one place that decides which kind of lock a folder gets:

- "flock" (filelock.FileLock) where the filesystem implements flock(2): the kernel releases it
  when its holder dies, however it dies.
- "soft" (filelock.SoftFileLock) where it does not: some Lustre mounts (mounted without -o flock),
  NFS without a lock manager, some FUSE filesystems answer flock with ENOSYS, ENOLCK or EOPNOTSUPP,
  and filelock then raises NotImplementedError (ENOSYS, before 3.24) or the OSError itself instead of locking. A soft lock
  is the lock file itself, created with O_CREAT|O_EXCL and holding its holder's pid and host; a
  lock file left behind by a process that died on the same host is removed by the next contender.

Which one a folder gets is found once per filesystem (a probe flock on a scratch file in that
folder) and can be forced with NANOCHAT_LOCK=flock|soft, e.g. `soft` on a Lustre mounted with
-o localflock, where flock succeeds but does not exclude other nodes.
"""
from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from pathlib import Path

from filelock import BaseFileLock, FileLock, SoftFileLock

from nanochat.common import ConfigError

LOCK_ENV = "NANOCHAT_LOCK"
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


def file_lock(path: str | os.PathLike, timeout: float = -1) -> BaseFileLock:
    """A lock on `path` (the lock file; its folder must exist) that works on this filesystem.
    Use it as filelock's locks: `with file_lock(p, timeout=60): ...`, filelock.Timeout when busy."""
    path = Path(path)
    try:
        kind = lock_kind(path.parent)
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot lock ({e.strerror})") from None
    cls = FileLock if kind == "flock" else SoftFileLock
    return cls(str(path), timeout=timeout)
