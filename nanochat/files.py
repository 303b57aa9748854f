"""
Files in the work directory: where it is (get_base_dir), atomic writes (a crash leaves the old file or
the new one, never half of one), and the code's git commit for result rows. Torch-free at import:
the orchestration's commands that never touch a tensor (status, cancel) read these.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Callable


def get_base_dir() -> Path:
    """Where large artifacts live (data shards, tokenizer, checkpoints). On a cluster: a shared FS."""
    d = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


# -----------------------------------------------------------------------------
# Atomic writes: write a temporary file in the same folder, fsync, then rename.
# A crash leaves either the old file or the new one, never half of one.

def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """write(tmp_path) writes the whole file under a temporary name in the same folder; it is then
    fsynced and renamed over `path`. On any error the temporary file is removed and `path` is untouched.
    The file gets the mode a plain open() would give (0666 less the umask): on a shared work
    directory a team's umask decides who can read run files, not this helper (mkstemp's 0600 would).
    An OSError (a full disk, a read-only folder) names the file it could not write."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temporary(path)
    except OSError as e:
        raise _naming(e, path, None) from None
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _naming(e, path, tmp) from None
        raise
    return path


def _create_temporary(path: Path) -> str:
    """A new empty file beside `path`, created with mode 0666 so that the umask applies."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _naming(e: OSError, path: Path, tmp: str | None) -> OSError:
    """An OSError whose message names a path: `path` where the error named none or only the
    temporary file (ENOSPC from write() names no file at all)."""
    if e.filename is not None and os.fspath(e.filename) != tmp:
        return e
    return OSError(e.errno, e.strerror or str(e), str(path)) if e.errno else OSError(f"{path}: {e}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(obj, path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd or os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
