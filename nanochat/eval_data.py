"""
The evaluation sets, fetched once into <base_dir>/eval_data, where the evaluation stages read them
(nanochat.tasks.common.resolve_data_dir) with the hub offline:

    core           nanochat's eval_bundle.zip (DCLM's in-context tasks), fetched from its own URL,
                   verified against a pinned sha256 and unpacked once -> eval_data/eval_bundle/
    arc_easy       allenai/ai2_arc ARC-Easy/test        -> eval_data/arc_easy.parquet
    arc_challenge  allenai/ai2_arc ARC-Challenge/test   -> eval_data/arc_challenge.parquet
    mmlu           cais/mmlu all/test                   -> eval_data/mmlu.parquet
    gsm8k          openai/gsm8k main/test               -> eval_data/gsm8k.parquet
    humaneval      openai/openai_humaneval test         -> eval_data/humaneval.parquet

These are the splits nanochat's chat_eval.py scores (test, for every task); each split's files are
those the hub lists at its pinned commit (nanochat.fetch.HUB_SPLITS) and the task file is their
rows in the hub's own columns, which nanochat/tasks/* read.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from nanochat.errors import ConfigError
from nanochat.files import atomic_write, atomic_write_json
from nanochat.fetch import HUB_SPLITS, HubSplit, fetch_split, fetch_url, hub_repo_dir, split_files
from nanochat.locking import file_lock

# nanochat's scripts/base_eval.py fetches the bundle from here; the checksum is the one several
# public projects pin for that file (it is outside the hub, so nothing lists it for us)
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
BUNDLE = "eval_bundle"


@dataclass(frozen=True)
class EvalSet:
    name: str
    split: HubSplit | None     # None: the CORE bundle (a zip outside the hub)
    stage_kind: str            # the stage kind that reads it
    note: str


EVAL_SETS: dict[str, EvalSet] = {
    "core": EvalSet("core", None, "base_eval", "CORE: DCLM's in-context tasks (eval_bundle.zip)"),
    "arc_easy": EvalSet("arc_easy", HUB_SPLITS["arc_easy/test"], "chat_eval", "ARC-Easy test"),
    "arc_challenge": EvalSet("arc_challenge", HUB_SPLITS["arc_challenge/test"], "chat_eval", "ARC-Challenge test"),
    "mmlu": EvalSet("mmlu", HUB_SPLITS["mmlu/test"], "chat_eval", "MMLU test (57 subjects)"),
    "gsm8k": EvalSet("gsm8k", HUB_SPLITS["gsm8k/test"], "chat_eval", "GSM8K test"),
    "humaneval": EvalSet("humaneval", HUB_SPLITS["humaneval/test"], "chat_eval", "HumanEval (its only split, test)"),
}


def eval_set(name: str) -> EvalSet:
    if name not in EVAL_SETS:
        raise ConfigError(f"{name}: unknown evaluation set (known: {', '.join(EVAL_SETS)})")
    return EVAL_SETS[name]


def eval_dir(base_dir) -> Path:
    return Path(base_dir) / "eval_data"


def eval_path(base_dir, name: str) -> Path:
    """What the evaluation stage reads for a set: the CORE bundle's core.yaml, or the task's file."""
    if name == "core":
        return eval_dir(base_dir) / BUNDLE / "core.yaml"
    return eval_dir(base_dir) / f"{name}.parquet"


def is_present(base_dir, name: str) -> bool:
    return eval_path(base_dir, name).is_file() and _done(base_dir, name).is_file()


def _done(base_dir, name: str) -> Path:
    return eval_dir(base_dir) / f".{name}.done.json"


# -----------------------------------------------------------------------------

def ensure_eval_set(base_dir, name: str, bundle_url: str = "", bundle_sha256: str = "", workers: int = 4,
                    retries: int = 5, backoff_s: float = 1.0, log=print) -> dict:
    """Fetch a set (verified) and put it where the evaluation stages read it, once. Returns
    {"set", "path", "rows" or "tasks", "fetch": the fetch summary}."""
    es = eval_set(name)
    eval_dir(base_dir).mkdir(parents=True, exist_ok=True)
    if es.split is None:
        return _ensure_bundle(base_dir, bundle_url or EVAL_BUNDLE_URL, bundle_sha256 or EVAL_BUNDLE_SHA256,
                              retries, backoff_s, log)
    import pyarrow as pa
    import pyarrow.parquet as pq
    summary = fetch_split(base_dir, es.split, workers=workers, retries=retries, backoff_s=backoff_s, log=log)
    out, done = eval_path(base_dir, name), _done(base_dir, name)
    with file_lock(str(done) + ".lock"):
        info = _read(done)
        files = split_files(base_dir, es.split)
        if info.get("files") != [f.name for f in files] or not out.is_file():
            try:
                table = pa.concat_tables([pq.read_table(f) for f in files])
            except (pa.ArrowException, OSError) as e:
                raise ConfigError(f"{files[0]}: unreadable parquet ({type(e).__name__}: {str(e)[:200]})") from None
            atomic_write(out, lambda tmp: pq.write_table(table, tmp))
            info = {"set": name, "path": str(out), "rows": table.num_rows, "files": [f.name for f in files],
                    "repo_id": es.split.repo_id, "revision": es.split.revision, "split": es.split.key}
            atomic_write_json(done, info)
            log(f"[data] {name}: {table.num_rows} rows -> {out}")
    return {**info, "fetch": summary}


def _ensure_bundle(base_dir, url: str, sha256: str, retries: int, backoff_s: float, log) -> dict:
    zip_dir = hub_repo_dir(base_dir, BUNDLE)
    summary = fetch_url(url, zip_dir, f"{BUNDLE}.zip", sha256, retries=retries, backoff_s=backoff_s, log=log)
    done = _done(base_dir, "core")
    with file_lock(str(done) + ".lock"):
        info = _read(done)
        final = eval_dir(base_dir) / BUNDLE
        if info.get("sha256") != sha256 or not (final / "core.yaml").is_file():
            members = unpack_bundle(zip_dir / f"{BUNDLE}.zip", final)
            info = {"set": "core", "path": str(final), "sha256": sha256, "url": url, "files": members}
            atomic_write_json(done, info)
            log(f"[data] core: {members} files of {BUNDLE}.zip -> {final}")
    return {**info, "fetch": summary}


def unpack_bundle(zip_path: Path, final: Path) -> int:
    """Unpack the zip's eval_bundle/ folder into `final` (staged beside it, then renamed into place)
    and return its number of files. Other top-level entries (a __MACOSX/ folder) are left out, as
    nanochat's base_eval.py keeps only eval_bundle/; a member with an absolute path, a '..' or a
    link is refused: the archive comes from outside and must not write anywhere else."""
    staging = final.parent / f".{final.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            files = 0
            for m in z.infolist():
                path = PurePosixPath(m.filename)
                is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
                if path.is_absolute() or ".." in path.parts or "\\" in m.filename or is_link:
                    raise ConfigError(f"{zip_path}: member {m.filename!r} would be written outside the bundle "
                                      "(refused)")
                if not path.parts or path.parts[0] != BUNDLE:
                    continue
                files += not m.is_dir()
                z.extract(m, staging)
    except zipfile.BadZipFile as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{zip_path}: not a zip file ({e})") from None
    except ConfigError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not (staging / BUNDLE / "core.yaml").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise ConfigError(f"{zip_path}: no {BUNDLE}/core.yaml in the archive")
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    (staging / BUNDLE).rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return files


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


__all__ = ["EVAL_SETS", "EVAL_BUNDLE_URL", "EVAL_BUNDLE_SHA256", "eval_set", "eval_dir", "eval_path", "is_present",
           "ensure_eval_set", "unpack_bundle"]
