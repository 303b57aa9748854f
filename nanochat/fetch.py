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
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path


from nanochat.dataset import shard_name
from nanochat.errors import ConfigError, FetchError, one_line
from nanochat.files import atomic_write_json
from nanochat.locking import file_lock

MANIFEST = "fetched.json"
STAGING = ".staging"


@dataclass(frozen=True)
class PretrainingSet:
    """A shuffled pretraining corpus published as shard_NNNNN.parquet files with a `text` column."""
    name: str
    repo_id: str
    revision: str              # the hub commit fetched ("main": resolved at the first fetch and recorded)
    last_shard: int            # the highest shard index; pinned as the validation shard
    chars_per_shard: float     # typical characters of text per shard (plans and token estimates)
    bytes_per_shard: float     # typical parquet size on disk (plans)
    chars_per_token: float     # the tokenizer's compression on the set, as nanochat reports it (plans)
    note: str


# Both sets were cut by nanochat's dev/repackage_data_reference.py: a shard closes once it holds
# 250M characters (~100 MB of zstd parquet); nanochat's dataset.py has the repo ids and last shards.
# Compression: 4.8 characters per token is nanochat's 65536-token tokenizer on FineWeb-Edu; for
# ClimbMix nanochat's log gives ~150 shards for ~7B tokens (its 32768-token tokenizer): 5.36. A
# larger vocabulary compresses more, so that figure errs towards fetching too few shards; the
# base_train stage measures its own tokenizer at start and checks again.
# ClimbMix's commit is one public code pins; FineWeb-Edu's pin is taken at its first fetch.
PRETRAINING_SETS: dict[str, PretrainingSet] = {
    "fineweb-edu-100b": PretrainingSet("fineweb-edu-100b", "karpathy/fineweb-edu-100b-shuffle", "main", 1822,
                                       250e6, 100e6, 4.8,
                                       "FineWeb-Edu 100B tokens, shuffled (nanochat's original corpus)"),
    "climbmix-400b": PretrainingSet("climbmix-400b", "karpathy/climbmix-400b-shuffle",
                                    "915333b4f8b8684f39aeaafea600fea6f43fb703", 6542, 250e6, 100e6, 250e6 * 150 / 7e9,
                                    "NVIDIA ClimbMix 400B tokens, shuffled (nanochat's corpus since 2026-03-04)"),
}
CHARS_PER_TOKEN = 4.8   # other text (conversations, the user's folders): as on FineWeb-Edu


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


def shards_for_tokens(ds: PretrainingSet, tokens: float, margin: float = 1.1) -> int:
    """Training shards that hold `tokens` (with a margin), plus the validation shard."""
    train = max(1, math.ceil(tokens * ds.chars_per_token * margin / ds.chars_per_shard))
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


def _hub_call(what: str, call, retries: int, backoff_s: float, log):
    """call() retried with exponential backoff; a ConfigError (bad input: no such file or revision)
    is not retried; the last failure is one FetchError line naming `what` and the endpoint."""
    for attempt in range(1, retries + 1):
        try:
            return call()
        except ConfigError:
            raise
        except Exception as e:  # HTTP errors, connection errors, a malformed endpoint: all one line
            if _not_found(e):
                raise ConfigError(f"{what}: not on the hub at {_endpoint()} ({one_line(e)})") from None
            if attempt == retries:
                raise FetchError(f"{what}: no answer from {_endpoint()} after {retries} attempts "
                                 f"({one_line(e)})") from None
            log(f"[fetch] {what}: {one_line(e)}; retrying")
            time.sleep(backoff_s * 2 ** (attempt - 1))


def _not_found(e: Exception) -> bool:
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    return isinstance(e, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError))


def _expected(info) -> dict:
    lfs = getattr(info, "lfs", None)
    return {"size": int(info.size), "sha256": lfs.sha256 if lfs else None,
            "git_sha1": None if lfs else getattr(info, "blob_id", None)}


def hub_file_info(repo_id: str, files: list[str], revision: str = "main", token=None, retries: int = 5,
                  backoff_s: float = 1.0, log=print) -> dict[str, dict]:
    """Size and checksum of each file, from one `paths-info` request (retried with backoff). A file
    the hub does not list is an error naming it."""
    from huggingface_hub import HfApi
    infos = _hub_call(f"{repo_id}@{revision}", lambda: HfApi(token=token).get_paths_info(
        repo_id, files, repo_type="dataset", revision=revision), retries, backoff_s, log)
    out = {info.path: _expected(info) for info in infos}
    missing = [f for f in files if f not in out]
    if missing:
        raise ConfigError(f"{repo_id}/{missing[0]}: not on the hub (revision {revision})")
    return out


COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def resolve_revision(repo_id: str, revision: str, retries: int = 5, backoff_s: float = 1.0, log=print) -> str:
    """The commit a branch or tag names today (a commit stays itself, with no network)."""
    if COMMIT_RE.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi
    info = _hub_call(f"{repo_id}@{revision}", lambda: HfApi().dataset_info(repo_id, revision=revision),
                     retries, backoff_s, log)
    if not info.sha:
        raise FetchError(f"{repo_id}@{revision}: the hub named no commit for this revision")
    return info.sha


# -----------------------------------------------------------------------------
# Splits of hub datasets, found in the hub's own file listing at a pinned commit

@dataclass(frozen=True)
class HubSplit:
    """One split of a hub dataset, as the hub lays its parquet out: <folder>/<split>-NNNNN-of-NNNNN.parquet
    (the file names are read from the hub's listing of the folder at `revision`, not written down here)."""
    repo_id: str
    revision: str          # a commit
    folder: str            # the config's folder in the repository
    split: str
    rows: int              # about (plans)
    bytes: int = 0         # the split's size, where known before fetching (plans); 0 = listed at fetch

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.split}"

    def matches(self, path: str) -> bool:
        name = rf"{re.escape(self.folder)}/{re.escape(self.split)}-\d{{5}}-of-\d{{5}}(-[0-9a-f]+)?\.parquet"
        return re.fullmatch(name, path) is not None


# The sets nanochat trains and scores on, each at the commit public code pins it at (two or more
# independent pins agree for ARC, MMLU, GSM8K and HumanEval). Rows: the split sizes nanochat quotes.
HUB_SPLITS: dict[str, HubSplit] = {
    "smoltalk/train": HubSplit("HuggingFaceTB/smol-smoltalk", "f73fe857d519ff6ac5af2ea67c4d3834da7b8bcc", "data",
                               "train", 460_000),
    "mmlu/auxiliary_train": HubSplit("cais/mmlu", "c30699e8356da336a370243923dbaf21066bb9fe", "all", "auxiliary_train",
                                     99_842),
    "gsm8k/train": HubSplit("openai/gsm8k", "740312add88f781978c0658806c59bc2815b9866", "main", "train", 7_473),
    "arc_easy/test": HubSplit("allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453", "ARC-Easy", "test", 2_376),
    "arc_challenge/test": HubSplit("allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453", "ARC-Challenge",
                                   "test", 1_172),
    "mmlu/test": HubSplit("cais/mmlu", "c30699e8356da336a370243923dbaf21066bb9fe", "all", "test", 14_042, 3_504_718),
    "gsm8k/test": HubSplit("openai/gsm8k", "740312add88f781978c0658806c59bc2815b9866", "main", "test", 1_319),
    "humaneval/test": HubSplit("openai/openai_humaneval", "7dce6050a7d6d172f3cc5c32aa97f52fa1a2e544",
                               "openai_humaneval", "test", 164, 83_920),
}


def hub_repo_dir(base_dir: str | os.PathLike, repo_id: str) -> Path:
    """<base_dir>/data/hub/<owner>--<name>: a repository's verified files, under their paths in the repo."""
    return Path(base_dir) / "data" / "hub" / repo_id.replace("/", "--")


def split_files(base_dir: str | os.PathLike, split: HubSplit) -> list[Path]:
    """The verified files of a fetched split (offline), else a ConfigError naming what is missing."""
    dest = hub_repo_dir(base_dir, split.repo_id)
    names = read_manifest(dest).get("splits", {}).get(split.key)
    if not names:
        raise ConfigError(f"{dest / split.key}-*.parquet: missing; fetch it where the network is")
    check_present(dest, names)
    return [dest / n for n in names]


def fetch_split(base_dir: str | os.PathLike, split: HubSplit, workers: int = 8, retries: int = 5,
                backoff_s: float = 1.0, log=print) -> dict:
    """Make a split's files present and verified: the hub's listing of its folder at the pinned commit
    names them (with sizes and checksums); a split already fetched does no network work."""
    dest = hub_repo_dir(base_dir, split.repo_id)
    names = read_manifest(dest).get("splits", {}).get(split.key)
    if names and len(present(dest, names)) == len(names):
        return fetch_files(split.repo_id, names, dest, split.revision, workers, retries, backoff_s, log)
    from huggingface_hub import HfApi
    listing = _hub_call(f"{split.repo_id}@{split.revision} {split.folder}/",
                        lambda: list(HfApi().list_repo_tree(split.repo_id, split.folder, revision=split.revision,
                                                            repo_type="dataset")), retries, backoff_s, log)
    expected = {f.path: _expected(f) for f in listing if getattr(f, "size", None) is not None and split.matches(f.path)}
    if not expected:
        raise ConfigError(f"{split.repo_id}@{split.revision}: the hub lists no {split.key}-NNNNN-of-NNNNN.parquet")
    names = sorted(expected)
    summary = fetch_files(split.repo_id, names, dest, split.revision, workers, retries, backoff_s, log,
                          expected=expected)
    with file_lock(str(dest / ".fetch.lock")):
        manifest = read_manifest(dest)
        manifest.setdefault("splits", {})[split.key] = names
        atomic_write_json(dest / MANIFEST, manifest)
    return summary


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


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
            last = one_line(e)
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
                workers: int = 8, retries: int = 5, backoff_s: float = 1.0, log=print,
                expected: dict[str, dict] | None = None) -> dict:
    """Make `files` of a hub dataset present and verified under dest. Returns a summary:
    {"dest", "repo_id", "revision", "files", "fetched", "present", "bytes", "seconds"}. No network
    when all are present. Every file of one folder comes from one commit: a branch name is resolved
    at the first fetch and recorded in the manifest, and later fetches into the folder take that
    commit (more shards next month are still shards of the same corpus). `expected`: sizes and
    checksums already listed (a split's listing), else one `paths-info` request asks for them."""
    t0 = time.perf_counter()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    todo = [f for f in files if f not in set(present(dest, files))]
    recorded = read_manifest(dest).get("revision", "")
    summary = {"dest": str(dest), "repo_id": repo_id, "revision": recorded or revision, "files": len(files),
               "fetched": 0, "present": len(files) - len(todo), "bytes": 0}
    if not todo:
        summary["seconds"] = time.perf_counter() - t0
        return summary
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        check_present(dest, files, "HF_HUB_OFFLINE is set here (compute nodes have no internet)")
    with file_lock(str(dest / ".fetch.lock")):
        todo = [f for f in files if f not in set(present(dest, files))]   # another job may have done it
        commit = _pinned_commit(dest, repo_id, revision, retries, backoff_s, log)
        if expected is None or commit != revision:
            expected = hub_file_info(repo_id, todo, commit, retries=retries, backoff_s=backoff_s, log=log)
        total = sum(expected[f]["size"] or 0 for f in todo)
        log(f"[fetch] {repo_id}@{commit[:12]}: {len(todo)} of {len(files)} files to fetch ({total / 1e6:.1f} MB) "
            f"into {dest}")
        bar = _byte_bar(total, repo_id.split("/")[-1])
        done: dict[str, dict] = {}
        errors: list[str] = []
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
                futures = {pool.submit(_fetch_one, repo_id, f, dest, expected[f], commit, retries, backoff_s,
                                       _forwarding_bar_class(bar), log): f for f in todo}
                for fut in as_completed(futures):
                    try:
                        done[futures[fut]] = fut.result()
                    except (FetchError, ConfigError) as e:
                        errors.append(str(e))
        finally:
            bar.close()
            # record every verified file, also when others failed: a rerun fetches only the rest
            manifest = read_manifest(dest) or {"repo_id": repo_id, "files": {}}
            manifest["revision"] = commit
            manifest["files"].update(done)
            atomic_write_json(dest / MANIFEST, manifest)
            shutil.rmtree(dest / STAGING, ignore_errors=True)
        if errors:
            raise FetchError(sorted(errors)[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    summary.update(revision=commit, fetched=len(done), bytes=sum(d["size"] or 0 for d in done.values()),
                   seconds=time.perf_counter() - t0)
    return summary


def _pinned_commit(dest: Path, repo_id: str, revision: str, retries: int, backoff_s: float, log) -> str:
    """The commit to fetch into dest: the one recorded there, else `revision` resolved now. A commit
    other than the recorded one is refused: the folder would mix two versions of the set."""
    recorded = read_manifest(dest).get("revision", "")
    if COMMIT_RE.fullmatch(recorded):
        if COMMIT_RE.fullmatch(revision) and revision != recorded:
            raise ConfigError(f"{dest}: holds {repo_id} at commit {recorded}; fetching {revision} into it would mix "
                              "two versions (use another work directory, or delete the folder)")
        return recorded
    return resolve_revision(repo_id, revision, retries, backoff_s, log)


def fetch_pretraining_shards(base_dir: str | os.PathLike, name: str, num_shards: int, workers: int = 8,
                             revision: str = "", retries: int = 5, backoff_s: float = 1.0, log=print) -> dict:
    """revision "" = the set's pinned one (PRETRAINING_SETS)."""
    ds = pretraining_set(name)
    return fetch_files(ds.repo_id, shard_files(ds, num_shards), pretraining_dir(base_dir, name),
                       revision or ds.revision, workers, retries, backoff_s, log)


def fetch_url(url: str, dest: str | os.PathLike, name: str, sha256: str, retries: int = 5, backoff_s: float = 1.0,
              log=print) -> dict:
    """A file published outside the hub (nanochat's eval_bundle.zip), made present as dest/name and
    verified against a pinned sha256, with the hub files' guarantees: staged, retried with backoff
    (resuming a cut transfer), moved into place only once verified, recorded in dest/fetched.json,
    and no network when it is present. Same summary as fetch_files."""
    from huggingface_hub.file_download import http_get
    t0 = time.perf_counter()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    summary = {"dest": str(dest), "repo_id": url, "revision": f"sha256:{sha256[:12]}", "files": 1, "fetched": 0,
               "present": 1, "bytes": 0}
    entry = read_manifest(dest).get("files", {}).get(name, {})
    if present(dest, [name]) and entry.get("sha256") == sha256:
        summary["seconds"] = time.perf_counter() - t0
        return summary
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError(f"{dest / name}: missing; fetch it where the network is (HF_HUB_OFFLINE is set here)")
    final, staged = dest / name, dest / STAGING / name
    with file_lock(str(dest / ".fetch.lock")):
        last = ""
        for attempt in range(1, retries + 1):
            staged.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(staged, "ab") as f:
                    http_get(url, f, resume_size=f.tell())
                last = verify_file(staged, name, {"sha256": sha256})
            except Exception as e:  # network and HTTP errors: retried, then one line
                last = one_line(e)
            if not last:
                break
            if "sha256" in last:
                staged.unlink(missing_ok=True)    # wrong bytes: start again from nothing
            if attempt < retries:
                log(f"[fetch] {url}: attempt {attempt}/{retries} failed ({last}); retrying")
                time.sleep(backoff_s * 2 ** (attempt - 1))
        if last:
            shutil.rmtree(dest / STAGING, ignore_errors=True)
            raise FetchError(f"{final}: not fetched after {retries} attempts from {url} ({last})")
        size = staged.stat().st_size
        os.replace(staged, final)
        manifest = read_manifest(dest) or {"repo_id": url, "files": {}}
        manifest["files"][name] = {"size": size, "sha256": sha256, "url": url}
        atomic_write_json(dest / MANIFEST, manifest)
        shutil.rmtree(dest / STAGING, ignore_errors=True)
    summary.update(fetched=1, present=0, bytes=size, seconds=time.perf_counter() - t0)
    return summary


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


__all__ = ["PRETRAINING_SETS", "HUB_SPLITS", "HubSplit", "pretraining_set", "shard_files", "shards_for_tokens",
           "pretraining_dir", "hub_repo_dir", "fetch_files", "fetch_split", "split_files", "fetch_url",
           "fetch_pretraining_shards", "fetched_shards", "check_present", "resolve_revision"]
