"""
The batch-size cache: one JSON file per sha256 key in a shared folder (default <base_dir>/batch_size_cache),
read defensively (a bad file is ignored with a warning, never trusted) and written atomically under a
file lock, with the rule that keeps a run-time out-of-memory fallback against an older probe.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from filelock import Timeout

from nanochat.distributed import print0
from nanochat.files import atomic_write_json, get_base_dir
from nanochat.locking import file_lock
from nanochat.training.geometry import is_positive_int

SPEED_CHOICE_TTL_S = 7 * 24 * 3600   # a size chosen for speed (below the memory baseline) is re-measured after this


def default_cache_dir(base_dir: str | os.PathLike | None = None) -> Path:
    return Path(base_dir or get_base_dir()) / "batch_size_cache"


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


MAX_ENTRY_BYTES = 4 << 20   # an entry is a few kB; a file larger than this is not one


def _check_entry(entry, key: str, rows: int | None) -> None:
    """Raise ValueError unless entry is a well-formed cache entry for key (every field a reader uses)."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a JSON object, got {type(entry).__name__}")
    bs, accum = entry.get("device_batch_size"), entry.get("grad_accum")
    if not (is_positive_int(bs) and is_positive_int(accum)):
        raise ValueError("device_batch_size/grad_accum must be positive integers")
    if entry.get("key") != key:
        raise ValueError("key does not match the file name")
    if rows is not None and bs * accum != rows:
        raise ValueError(f"device_batch_size x grad_accum = {bs * accum}, expected {rows}")
    if entry.get("max_found") is not None and not (isinstance(entry["max_found"], int) and not isinstance(entry["max_found"], bool)):
        raise ValueError("max_found must be an integer")
    trials = entry.get("trials", [])
    if not (isinstance(trials, list) and all(isinstance(t, dict) and isinstance(t.get("batch_size"), int)
                                             and isinstance(t.get("ok", True), bool) for t in trials)):
        raise ValueError("trials must be a list of {batch_size, ok, ...}")
    fallbacks = entry.get("fallbacks", [])
    if not (isinstance(fallbacks, list) and all(isinstance(f, dict) for f in fallbacks)):
        raise ValueError("fallbacks must be a list of objects")
    expires = entry.get("expires_at")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))):
        raise ValueError("expires_at must be a number (unix time)")


def read_cache(cache_dir, key: str, rows: int | None = None) -> dict | None:
    """The entry for key, or None when missing or expired. Whatever is wrong with the file (unreadable,
    not UTF-8, not JSON, nested too deep, wrong types, inconsistent numbers) it is ignored with a
    warning naming it: the caller probes again and overwrites it. Never raises for the file's content."""
    path = cache_path(cache_dir, key)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)   # an entry is a few kB; a device or huge file is not one
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"batch size cache {path}: unreadable ({e}); probing again")
        return None
    try:
        if len(data) > MAX_ENTRY_BYTES:
            raise ValueError(f"larger than {MAX_ENTRY_BYTES} bytes")
        entry = json.loads(data.decode("utf-8"))
        _check_entry(entry, key, rows)
    except (ValueError, KeyError, TypeError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        warnings.warn(f"batch size cache {path}: corrupt entry ignored ({type(e).__name__}: {str(e)[:200]}); probing again")
        return None
    if entry.get("expires_at") is not None and entry["expires_at"] < time.time():
        print0(f"auto batch size: cache entry {path} (a speed-based choice) has expired; probing again")
        return None
    return entry


def update_cache(cache_dir, key: str, update, lock_timeout_s: float = 60.0) -> Path:
    """Read-modify-write of one entry under its file lock: update(the current entry or None) returns the
    entry to write, or None to leave the file as it is. Reading under the lock is what keeps two writers
    (a probe and a run-time fallback, two ranks' fallbacks) from each writing over what the other read."""
    path = cache_path(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(str(path) + ".lock", timeout=lock_timeout_s):
            old = read_cache(cache_dir, key) if path.exists() else None
            new = update(old)
            if new is not None:
                atomic_write_json(path, dict(new, key=key))
    except Timeout:
        warnings.warn(f"batch size cache {path}: lock busy for {lock_timeout_s} s; not cached")
    except OSError as e:   # e.g. a directory squatting on the entry's name: the answer still holds, uncached
        warnings.warn(f"batch size cache {path}: cannot write ({type(e).__name__}: {e}); not cached")
    return path


def _last_fallback_at(entry: dict) -> float | None:
    times = [f.get("at_unix") for f in entry.get("fallbacks", [])]
    times = [t for t in times if isinstance(t, (int, float)) and not isinstance(t, bool)]
    return max(times) if times else (0.0 if entry.get("fallbacks") else None)


def kept_entry(old: dict | None, new: dict) -> dict | None:
    """Which entry a write leaves (None: the old one stays). A run-time fallback on one job must not be
    undone by another job's older probe: an entry with fallbacks keeps its smaller device batch against
    a probe that started before its last fallback (probe_started_at; a probe without one counts as
    older). A fallback does not raise a size another writer has already lowered further. A probe
    started after the fallback (a --refresh) replaces it: that is a new measurement."""
    if old is None:
        return new
    smaller = old["device_batch_size"] < new["device_batch_size"]
    if new.get("source") == "fallback" and smaller:
        return None
    last_fallback = _last_fallback_at(old)
    if new.get("source") == "probe" and smaller and last_fallback is not None:
        started = new.get("probe_started_at")
        if not isinstance(started, (int, float)) or started < last_fallback:
            print0(f"auto batch size: keeping the cached run-time fallback (device batch {old['device_batch_size']}) "
                   f"against a probe that started before it ({new['device_batch_size']})")
            return None
    return new


def write_cache(cache_dir, key: str, entry: dict, lock_timeout_s: float = 60.0) -> Path:
    """Atomic write under a file lock, as kept_entry decides against the entry already there."""
    with warnings.catch_warnings():   # a probe's reader already warned about a corrupt entry
        warnings.filterwarnings("ignore", message="batch size cache .*: corrupt entry ignored")
        return update_cache(cache_dir, key, lambda old: kept_entry(old, entry), lock_timeout_s)
