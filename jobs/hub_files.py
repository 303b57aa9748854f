"""
Small files in the real formats and hub layouts of every set the data stage fetches, made by the
project (nothing downloaded), for a local hub (jobs.local_hub) to serve: the rehearsal's and the
tests' stand-in for the hub, so that the real download, verification and conversion code runs.

- pretraining shards: shard_NNNNN.parquet with a `text` column in row groups, the last index pinned
  as validation (text: the English prose that ships with Python, nanochat.prepare);
- hub splits (nanochat.fetch.HUB_SPLITS) as <folder>/<split>-NNNNN-of-NNNNN.parquet with the sets'
  own columns: SmolTalk `messages` (+ `source`), MMLU question/subject/choices/answer, GSM8K
  question/answer, ARC id/question/choices{text,label}/answerKey, HumanEval task_id/prompt/
  canonical_solution/test/entry_point (rows from the repository's evaluation fixtures and
  nanochat.synthetic);
- eval_bundle.zip: an eval_bundle/ folder with core.yaml, eval_meta_data.csv and eval_data/ (the
  repository's fixture bundle).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "nanochat" / "eval_fixtures"


def _parquet(rows: list[dict], row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=row_group_size)
    return buf.getvalue()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pretraining_shards(ds, num_shards: int, chars_per_shard: int) -> dict[str, bytes]:
    """num_shards files as nanochat.fetch.shard_files names them, each ~chars_per_shard characters."""
    from nanochat.fetch import shard_files
    from nanochat.prepare import python_stdlib_documents
    docs = python_stdlib_documents(max_chars=chars_per_shard * num_shards)
    out, i = {}, 0
    for name in shard_files(ds, num_shards):
        texts, n = [], 0
        while n < chars_per_shard and docs:
            texts.append(docs[i % len(docs)])
            n += len(texts[-1])
            i += 1
        out[name] = _parquet([{"text": t} for t in texts], row_group_size=16)
    return out


def _smoltalk_rows(n: int, seed: int) -> list[dict]:
    """nanochat.synthetic conversations as SmolTalk rows: string contents, an optional system message."""
    from nanochat.synthetic import generate_conversations
    rows = []
    for i, conv in enumerate(generate_conversations(n, seed=seed, max_tokens=256)):
        messages = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
                     else "".join(p.get("text", "") for p in m["content"])} for m in conv["messages"]]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        rows.append({"messages": messages, "source": "synthetic"})
    return rows


def split_rows(key: str, n: int) -> list[dict]:
    """n rows of a hub split (nanochat.fetch.HUB_SPLITS key) in the set's own columns."""
    import pyarrow.parquet as pq
    name, split = key.split("/")
    if name == "smoltalk":
        return _smoltalk_rows(n, seed=0 if split == "train" else 1)
    if name == "mmlu":
        rows = pq.read_table(FIXTURES / "mmlu.parquet").to_pylist()
    elif name in ("gsm8k", "arc_easy", "arc_challenge", "humaneval"):
        rows = _jsonl(FIXTURES / f"{name}.jsonl")
    else:
        raise KeyError(f"no generator for {key}")
    return [rows[i % len(rows)] for i in range(n)]


def split_files(key: str, n: int, num_files: int = 1) -> dict[str, bytes]:
    """A split's rows in num_files parquet files, named as the hub names a split's files."""
    from nanochat.fetch import HUB_SPLITS
    split = HUB_SPLITS[key]
    rows = split_rows(key, n)
    per = -(-len(rows) // num_files)
    return {f"{split.folder}/{split.split}-{i:05d}-of-{num_files:05d}.parquet": _parquet(rows[i * per:(i + 1) * per])
            for i in range(num_files)}


def eval_bundle_zip() -> bytes:
    """The repository's fixture bundle as eval_bundle.zip lays it out (one top-level eval_bundle/)."""
    buf = io.BytesIO()
    root = FIXTURES / "eval_bundle"
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*")):
            if path.is_file():   # a fixed date: the same bytes, so the same sha256, on every run
                info = zipfile.ZipInfo(f"eval_bundle/{path.relative_to(root).as_posix()}", (2026, 1, 1, 0, 0, 0))
                z.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def populate(hub, pretraining: dict[str, int], splits: list[str], bundle: bool, rows: int = 8, train_rows: int = 200,
             chars_per_shard: int = 200_000, files_per_train_split: int = 2) -> dict:
    """Put every named set in the hub, each repository at its pinned commit: `rows` rows per test
    split, `train_rows` per training split (in files_per_train_split files, so that the listing
    names several). Returns the bundle's {"url", "sha256"} (when bundle) and what was added per set."""
    from nanochat.fetch import HUB_SPLITS, PRETRAINING_SETS, COMMIT_RE
    added = {}
    for name, num_shards in pretraining.items():
        ds = PRETRAINING_SETS[name]
        commit = ds.revision if COMMIT_RE.fullmatch(ds.revision) else ""
        files = pretraining_shards(ds, num_shards, chars_per_shard)
        for path, content in files.items():
            hub.add(ds.repo_id, path, content, commit=commit)
        added[name] = {"repo_id": ds.repo_id, "files": len(files), "bytes": sum(map(len, files.values()))}
    for key in splits:
        split = HUB_SPLITS[key]
        test = split.split == "test"
        files = split_files(key, rows if test else train_rows, 1 if test else files_per_train_split)
        for path, content in files.items():
            hub.add(split.repo_id, path, content, commit=split.revision)
        added[key] = {"repo_id": split.repo_id, "files": len(files), "bytes": sum(map(len, files.values()))}
    out = {"sets": added}
    if bundle:
        content = eval_bundle_zip()
        out.update(url=hub.add_url("eval_bundle.zip", content), sha256=hashlib.sha256(content).hexdigest())
        added["eval_bundle.zip"] = {"repo_id": out["url"], "files": 1, "bytes": len(content)}
    return out
