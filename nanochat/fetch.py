"""
Datasets from the Hugging Face hub, made present and verified in the shared work directory.

    from nanochat.fetch import fetch_pretraining_shards
    folder = fetch_pretraining_shards(base_dir, "fineweb-edu-100b", num_shards=240)

Downloads go through huggingface_hub (hf_hub_download): it follows the hub's redirects, resumes a
transfer cut mid-file with an HTTP Range request, honours HF_ENDPOINT (a mirror), HF_TOKEN and
HF_HUB_OFFLINE, and speaks Xet where the hub serves it. This module adds what a cluster's shared
filesystem needs on top of it:
- files are fetched in parallel into <dest>/.staging/ and only moved into place (os.replace, atomic)
  after they are verified: the size and the checksum the hub lists for the file (sha256 for LFS
  files, the git blob sha1 otherwise; one `paths-info` request for all files) and, for parquet, that
  the file opens;
- each file is retried with exponential backoff (a 500, a cut connection, a short or corrupt body);
  a file that never verifies is a one-line error naming it, and nothing half-written is left in place;
- <dest>/fetched.json records what was verified, so a second run with everything present stats the
  files and returns, with no network work at all (compute nodes without internet rely on that).
The hub's own cache (~/.cache/huggingface) is not used: a 100 GB corpus should live once, in the
work directory the training stages read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path


from nanochat.common import ConfigError, atomic_write_json
from nanochat.dataset import shard_name
from nanochat.locking import file_lock

MANIFEST = "fetched.json"
STAGING = ".staging"


@dataclass(frozen=True)
class PretrainingSet:
    """A shuffled pretraining corpus published as shard_NNNNN.parquet files with a `text` column."""
    name: str
    repo_id: str
    last_shard: int            # the highest shard index; pinned as the validation shard
    chars_per_shard: float     # typical characters of text per shard (plans and token estimates)
    bytes_per_shard: float     # typical parquet size on disk (plans)
    note: str


# nanochat's own arithmetic (speedrun.sh): ~250M characters and ~100 MB per FineWeb-Edu shard, ~4.8
# characters per token with its 65536-token tokenizer. Repo ids and the last shard indices are the
# ones nanochat's dataset.py downloads from; ClimbMix's per-shard sizes are assumed alike (not measured).
PRETRAINING_SETS: dict[str, PretrainingSet] = {
    "fineweb-edu-100b": PretrainingSet("fineweb-edu-100b", "karpathy/fineweb-edu-100b-shuffle", 1822,
                                       250e6, 100e6, "FineWeb-Edu 100B tokens, shuffled (nanochat's original corpus)"),
    "climbmix-400b": PretrainingSet("climbmix-400b", "karpathy/climbmix-400b-shuffle", 6542,
                                    250e6, 100e6, "NVIDIA ClimbMix 400B tokens, shuffled (nanochat's current corpus)"),
}
CHARS_PER_TOKEN = 4.8   # nanochat's measured compression of its 65536-token tokenizer on FineWeb-Edu


def pretraining_set(name: str) -> PretrainingSet:
    if name not in PRETRAINING_SETS:
        raise ConfigError(f"{name}: unknown pretraining set (known: {', '.join(PRETRAINING_SETS)})")
    return PRETRAINING_SETS[name]


def shard_files(ds: PretrainingSet, num_shards: int) -> list[str]:
    """num_shards files: training shards 0..num_shards-2 and the set's last shard, pinned as the
    validation shard (it sorts last, so the loaders take it for validation whatever N is, and
    fetching more shards later never turns the validation shard into training data)."""
    if not 2 <= num_shards <= ds.last_shard + 1:
        raise ConfigError(f"{ds.name}: num_shards={num_shards}: need 2..{ds.last_shard + 1} "
                          "(the last one is the validation shard)")
    return [shard_name(i) for i in range(num_shards - 1)] + [shard_name(ds.last_shard)]


def shards_for_tokens(ds: PretrainingSet, tokens: float, chars_per_token: float = CHARS_PER_TOKEN,
                      margin: float = 1.1) -> int:
    """Training shards that hold `tokens` (with a margin), plus the validation shard."""
    train = max(1, math.ceil(tokens * chars_per_token * margin / ds.chars_per_shard))
    return min(train + 1, ds.last_shard + 1)


def pretraining_dir(base_dir: str | os.PathLike, name: str) -> Path:
    return Path(base_dir) / "data" / name


# -----------------------------------------------------------------------------
# The manifest: what was verified and put in place

def read_manifest(dest: Path) -> dict:
    try:
        data = json.loads((Path(dest) / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a damaged manifest only means the files are verified again
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {}


def present(dest: Path, files: list[str]) -> list[str]:
    """The files that are in place with the size recorded when they were verified (stat only)."""
    have = read_manifest(dest).get("files", {})
    out = []
    for name in files:
        entry = have.get(name)
        try:
            if isinstance(entry, dict) and (Path(dest) / name).stat().st_size == entry.get("size"):
                out.append(name)
        except OSError:
            pass
    return out


def check_present(dest: Path, files: list[str], hint: str = "") -> None:
    """Offline check for training stages: every file is in place and verified, else one line naming
    the first missing one."""
    ok = set(present(dest, files))
    for name in files:
        if name not in ok:
            path = Path(dest) / name
            why = "missing" if not path.exists() else "not verified (size differs or no fetch record)"
            raise ConfigError(f"{path}: {why}; fetch it where the network is{': ' + hint if hint else ''}")


# -----------------------------------------------------------------------------
# Verification

def _hash_file(path: Path, algo: str, prefix: bytes = b"") -> str:
    h = hashlib.new(algo)
    h.update(prefix)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, name: str, expected: dict) -> str:
    """'' when the file matches the hub's size and checksum (and opens, for parquet), else why not."""
    size = path.stat().st_size
    if expected.get("size") is not None and size != expected["size"]:
        return f"size {size} != {expected['size']} listed by the hub"
    if expected.get("sha256"):
        got = _hash_file(path, "sha256")
        if got != expected["sha256"]:
            return f"sha256 {got[:12]}... != {expected['sha256'][:12]}... listed by the hub"
    elif expected.get("git_sha1"):
        got = _hash_file(path, "sha1", b"blob %d\0" % size)
        if got != expected["git_sha1"]:
            return f"git blob sha1 {got[:12]}... != {expected['git_sha1'][:12]}... listed by the hub"
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            pq.ParquetFile(path).metadata
        except (pa.ArrowException, OSError) as e:
            return f"not a readable parquet file ({e.__class__.__name__}: {e})"
    return ""


def hub_file_info(repo_id: str, files: list[str], revision: str = "main", token=None, retries: int = 5,
                  backoff_s: float = 1.0, log=print) -> dict[str, dict]:
    """Size and checksum of each file, from one `paths-info` request (retried with backoff). A file
    the hub does not list is an error naming it."""
    from huggingface_hub import HfApi
    for attempt in range(1, retries + 1):
        try:
            infos = HfApi(token=token).get_paths_info(repo_id, files, repo_type="dataset", revision=revision)
            break
        except Exception as e:  # HTTP errors, connection errors, a malformed endpoint: all one line
            if attempt == retries:
                raise FetchError(f"{repo_id}: could not list files on {_endpoint()} after {retries} attempts "
                                 f"({_one_line(e)})") from None
            log(f"[fetch] {repo_id}: listing files failed ({_one_line(e)}); retrying")
            time.sleep(backoff_s * 2 ** (attempt - 1))
    out = {}
    for info in infos:
        lfs = getattr(info, "lfs", None)
        out[info.path] = {"size": int(info.size), "sha256": lfs.sha256 if lfs else None,
                          "git_sha1": None if lfs else getattr(info, "blob_id", None)}
    missing = [f for f in files if f not in out]
    if missing:
        raise ConfigError(f"{repo_id}/{missing[0]}: not on the hub (revision {revision})")
    return out


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


class FetchError(RuntimeError):
    """A file could not be fetched and verified after every retry (the work failed: exit 1)."""


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# -----------------------------------------------------------------------------
# Fetching

def _byte_bar(total_bytes: int, desc: str):
    from tqdm.auto import tqdm
    # disable=None: a bar on a terminal, silent in Slurm logs and tests
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=None)


def _forwarding_bar_class(shared):
    """A tqdm class for huggingface_hub's per-file bars that adds each file's bytes to one shared bar."""
    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            shared.update(n)

    return Forward


def _fetch_one(repo_id: str, name: str, dest: Path, expected: dict, revision: str, retries: int,
               backoff_s: float, tqdm_class, log) -> dict:
    from huggingface_hub import hf_hub_download
    staging = dest / STAGING
    final = dest / name
    last = ""
    for attempt in range(1, retries + 1):
        staged = staging / name
        try:
            got = Path(hf_hub_download(repo_id, name, repo_type="dataset", revision=revision,
                                       local_dir=staging, force_download=True, tqdm_class=tqdm_class))
            staged = got
            last = verify_file(got, name, expected)
        except Exception as e:  # network errors, HTTP errors, size checks inside huggingface_hub
            last = _one_line(e)
        if not last:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)   # same filesystem: atomic, a reader sees no file or the whole file
            return {"size": expected.get("size"), "sha256": expected.get("sha256"),
                    "git_sha1": expected.get("git_sha1"), "attempts": attempt}
        staged.unlink(missing_ok=True)
        if attempt < retries:
            wait = backoff_s * 2 ** (attempt - 1)
            log(f"[fetch] {repo_id}/{name}: attempt {attempt}/{retries} failed ({last}); retrying in {wait:.1f} s")
            time.sleep(wait)
    raise FetchError(f"{final}: not fetched after {retries} attempts from {repo_id} ({last})")


def fetch_files(repo_id: str, files: list[str], dest: str | os.PathLike, revision: str = "main",
                workers: int = 8, retries: int = 5, backoff_s: float = 1.0, log=print) -> dict:
    """Make `files` of a hub dataset present and verified under dest. Returns a summary:
    {"dest", "files", "fetched", "present", "bytes", "seconds"}. No network when all are present."""
    t0 = time.perf_counter()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if f not in set(present(dest, files))]
    summary = {"dest": str(dest), "repo_id": repo_id, "files": len(files), "fetched": 0,
               "present": len(files) - len(todo), "bytes": 0}
    if not todo:
        summary["seconds"] = time.perf_counter() - t0
        return summary
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        check_present(dest, files, "HF_HUB_OFFLINE is set here (compute nodes have no internet)")
    with file_lock(str(dest / ".fetch.lock")):
        todo = [f for f in files if f not in set(present(dest, files))]   # another job may have done it
        expected = hub_file_info(repo_id, todo, revision, retries=retries, backoff_s=backoff_s, log=log)
        total = sum(expected[f]["size"] or 0 for f in todo)
        log(f"[fetch] {repo_id}: {len(todo)} of {len(files)} files to fetch ({total / 1e6:.1f} MB) into {dest}")
        bar = _byte_bar(total, repo_id.split("/")[-1])
        done: dict[str, dict] = {}
        errors: list[str] = []
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
                futures = {pool.submit(_fetch_one, repo_id, f, dest, expected[f], revision, retries, backoff_s,
                                       _forwarding_bar_class(bar), log): f for f in todo}
                for fut in as_completed(futures):
                    try:
                        done[futures[fut]] = fut.result()
                    except (FetchError, ConfigError) as e:
                        errors.append(str(e))
        finally:
            bar.close()
            # record every verified file, also when others failed: a rerun fetches only the rest
            manifest = read_manifest(dest) or {"repo_id": repo_id, "revision": revision, "files": {}}
            manifest["files"].update(done)
            atomic_write_json(dest / MANIFEST, manifest)
            shutil.rmtree(dest / STAGING, ignore_errors=True)
        if errors:
            raise FetchError(sorted(errors)[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    summary.update(fetched=len(done), bytes=sum(d["size"] or 0 for d in done.values()),
                   seconds=time.perf_counter() - t0)
    return summary


def fetch_pretraining_shards(base_dir: str | os.PathLike, name: str, num_shards: int, workers: int = 8,
                             revision: str = "main", retries: int = 5, backoff_s: float = 1.0, log=print) -> dict:
    ds = pretraining_set(name)
    return fetch_files(ds.repo_id, shard_files(ds, num_shards), pretraining_dir(base_dir, name), revision,
                       workers, retries, backoff_s, log)


def fetched_shards(base_dir: str | os.PathLike, name: str) -> Path:
    """The folder of a fetched pretraining set, checked offline: at least two shards, the pinned
    validation shard among them, every recorded file in place with its verified size."""
    ds = pretraining_set(name)
    dest = pretraining_dir(base_dir, name)
    hint = f"python -m jobs data fetch {name} --shards N (or a `data` stage in the pipeline)"
    recorded = sorted(read_manifest(dest).get("files", {}))
    check_present(dest, recorded or [shard_name(0)], hint)
    if shard_name(ds.last_shard) not in recorded:
        check_present(dest, [shard_name(ds.last_shard)], hint)
    return dest


__all__ = ["PRETRAINING_SETS", "pretraining_set", "shard_files", "shards_for_tokens", "pretraining_dir",
           "fetch_files", "fetch_pretraining_shards", "fetched_shards", "check_present", "FetchError"]
