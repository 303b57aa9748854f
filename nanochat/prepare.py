"""
Data preparation that works offline on any machine:
- ensure_pretraining_data: writes FineWeb-Edu-layout shards into <base_dir>/data/<setting> from
  (a) text that ships with Python itself (the default: pydoc's topic help and stdlib docstrings),
  (b) a user folder of .txt / .jsonl files, or uses (c) a folder that already holds shards.
- ensure_tokenizer: trains a BPE tokenizer with rustbpe on the training shards (never the
  validation shard) and saves it to <base_dir>/tokenizer/<data>-v<vocab size>.
Each folder's name carries its settings, so pipelines with different data or vocabulary sizes
(the smoke pipeline and a depth-20 run, say) share one base_dir without touching each other.
Both are idempotent and hold a file lock, so concurrent Slurm jobs on a shared FS are safe:
the first one does the work, the others wait and then find it done.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.files import atomic_write_json, get_base_dir
from nanochat.dataset import (SHARD_GLOB, iter_shard_texts, list_shards, open_shard, shard_name, split_shards,
                              write_shard)
from nanochat.locking import file_lock
from nanochat.tokenizer import TOKENIZER_FILE, Tokenizer, iter_texts_for_training

DONE_FILE = "prepared.json"
DEFAULT_MAX_CHARS = 4_000_000  # a few MB: enough for a tiny model to learn something, quick to tokenize


def _path_tag(path: str | os.PathLike) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:10]


def data_dir(base_dir: str | os.PathLike, source: str = "", num_shards: int = 4,
             max_chars: int = DEFAULT_MAX_CHARS) -> Path:
    """Where ensure_pretraining_data writes shards for these settings."""
    origin = f"text-{_path_tag(source)}" if source else "stdlib"
    return Path(base_dir) / "data" / f"{origin}-{num_shards}shards-{max_chars}chars"


def tokenizer_dir(base_dir: str | os.PathLike, vocab_size: int, data_path: str | os.PathLike = "") -> Path:
    """Where ensure_tokenizer keeps the tokenizer trained on `data_path` (default: data_dir's default)."""
    data_path = Path(data_path) if data_path else data_dir(base_dir)
    return Path(base_dir) / "tokenizer" / f"{data_path.name}-{_path_tag(data_path)}-v{vocab_size}"


# -----------------------------------------------------------------------------
# Text sources

def python_stdlib_documents(max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """English prose that ships with every Python: the help topics of pydoc (the language reference
    in prose), then the docstrings of the standard library's modules, one document per module.
    Deterministic for a given Python version (sorted files, no randomness)."""
    import pydoc_data.topics as topics
    docs: list[str] = []
    total = 0
    for name in sorted(topics.topics):
        # each topic is long; split it into paragraphs groups of ~2000 chars so documents vary in size
        chunk = ""
        for para in topics.topics[name].split("\n\n"):
            chunk += para.strip() + "\n\n"
            if len(chunk) > 2000:
                docs.append(chunk.strip())
                chunk = ""
        if chunk.strip():
            docs.append(chunk.strip())
    total = sum(len(d) for d in docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip"}
    for path in sorted(stdlib.rglob("*.py")):
        if total >= max_chars:
            break
        if skip & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
        text = "\n\n".join(dict.fromkeys(parts))  # dedupe, keep order (the walk revisits the module)
        if text:
            docs.append(text)
            total += len(text)
    return docs


def iter_folder_documents(folder: Path, read_txt: bool = True):
    """.txt files (one document each) and .jsonl files (a `text` field per line), sorted by path,
    one document at a time; a bad line is a ConfigError naming the file and its 1-based line.
    read_txt=False skips the .txt files (checking: read with errors="replace", they cannot be bad)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no .txt or .jsonl files (and no {SHARD_GLOB} shards) in the data source")
    for path in files:
        if path.suffix == ".txt":
            if not read_txt:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj["text"]
                except (ValueError, KeyError, TypeError):
                    raise ConfigError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                if not isinstance(text, str):
                    raise ConfigError(f"{path}:{lineno}: 'text' must be a string")
                if text.strip():
                    yield text


def folder_documents(folder: Path) -> list[str]:
    return list(iter_folder_documents(folder))


def check_data_source(source: str | os.PathLike) -> None:
    """What ensure_pretraining_data will read, checked without writing anything (submit time):
    a folder of shards (each opens as parquet with a `text` column), or of .txt/.jsonl text."""
    from nanochat.fetch import PRETRAINING_SETS
    if str(source) in PRETRAINING_SETS:
        return   # fetched by the data stage; checked offline, naming a missing file, when training starts
    src = Path(source)
    if not src.is_dir():
        raise ConfigError(f"{src}: data_source folder not found")
    if any(src.glob(SHARD_GLOB)):
        train_shards, val_shard = split_shards(src)
        for shard in [*train_shards, val_shard]:
            open_shard(shard)
        return
    for _ in iter_folder_documents(src, read_txt=False):
        pass


# -----------------------------------------------------------------------------
# The two idempotent steps

def ensure_pretraining_data(base_dir: str | os.PathLike = "", source: str = "", num_shards: int = 4,
                            max_chars: int = DEFAULT_MAX_CHARS, row_group_size: int = 64) -> Path:
    """Returns the folder of shards to train on.
    source: "" -> Python's own text; a hub set name (fineweb-edu-100b, climbmix-400b) -> its fetched
    shards under <base_dir>/data/<set> (missing files are an error naming them); a folder holding
    shards -> used in place (nothing written);
    a folder of .txt/.jsonl -> written as shards under <base_dir>/data/<settings>."""
    base_dir = Path(base_dir or get_base_dir())
    from nanochat.fetch import PRETRAINING_SETS, fetched_shards
    if source in PRETRAINING_SETS:
        # fetched by a `data` stage (or `python -m jobs data fetch`): checked offline, never downloaded here
        return fetched_shards(base_dir, source)
    if source:
        src = Path(source)
        if not src.is_dir():
            raise ConfigError(f"{src}: data_source folder not found")
        if any(src.glob(SHARD_GLOB)):
            split_shards(src)  # validates: >= 2 shards
            return src
    if num_shards < 2:
        raise ConfigError(f"num_shards={num_shards}: need at least 2 (the last shard is for validation)")
    out = data_dir(base_dir, source, num_shards, max_chars)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {"source": str(Path(source).resolve()) if source else "python-stdlib", "num_shards": num_shards,
              "max_chars": max_chars}
    with file_lock(str(out / ".prepare.lock")):
        done = out / DONE_FILE
        if done.exists():
            have = json.loads(done.read_text())
            if {k: have.get(k) for k in wanted} != wanted:
                raise ConfigError(f"{done}: data was prepared with {have}, not {wanted}; remove {out} to prepare it again")
            return out
        docs = folder_documents(Path(source)) if source else python_stdlib_documents(max_chars)
        if len(docs) < num_shards:
            raise ConfigError(f"{source or 'python-stdlib'}: {len(docs)} documents is too few for {num_shards} shards")
        # Round-robin documents into shards so every shard (and validation) sees every kind of text.
        for i in range(num_shards):
            write_shard(out / shard_name(i), docs[i::num_shards], row_group_size=row_group_size)
        atomic_write_json(done, {**wanted, "num_documents": len(docs), "num_chars": sum(map(len, docs))})
    return out


def ensure_tokenizer(base_dir: str | os.PathLike = "", vocab_size: int = 4096, data_path: str | os.PathLike = "",
                     max_chars: int = 20_000_000) -> Tokenizer:
    """Load the tokenizer of this vocabulary size for this data, or train it on the training shards
    (not the validation shard). data_path: the shards folder (default: data_dir's default settings)."""
    base_dir = Path(base_dir or get_base_dir())
    data_path = Path(data_path) if data_path else data_dir(base_dir)
    tok_dir = tokenizer_dir(base_dir, vocab_size, data_path)
    tok_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(str(tok_dir / ".tokenizer.lock")):
        if (tok_dir / TOKENIZER_FILE).exists():
            tok = Tokenizer.load(tok_dir)
            if tok.get_vocab_size() != vocab_size:
                raise ConfigError(f"{tok_dir / TOKENIZER_FILE}: vocab_size is {tok.get_vocab_size()}, "
                                  f"config asks for {vocab_size}; remove {tok_dir} to train it again")
            return tok
        train_shards, _ = split_shards(data_path)
        texts = (t for shard in train_shards for t in iter_shard_texts(shard))
        tok = Tokenizer.train(iter_texts_for_training(texts, max_chars), vocab_size)
        tok.save(tok_dir)
        return tok


__all__ = ["ensure_pretraining_data", "ensure_tokenizer", "data_dir", "tokenizer_dir", "list_shards",
           "python_stdlib_documents", "folder_documents"]
