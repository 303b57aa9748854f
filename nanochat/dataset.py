"""
Pretraining shards in the FineWeb-Edu layout: <data_dir>/shard_NNNNN.parquet, each with a `text`
column, several row groups per shard; the last shard (by number) is the validation split.
This module reads and writes that layout and nothing else (preparation lives in prepare.py).
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.errors import ConfigError
from nanochat.files import atomic_write

SHARD_GLOB = "shard_*.parquet"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def list_shards(data_dir: str | os.PathLike) -> list[Path]:
    """All shards of a data folder, in order. A missing folder or one without shards is bad input."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ConfigError(f"{data_dir}: data folder not found")
    shards = sorted(p for p in data_dir.glob(SHARD_GLOB) if p.is_file())
    if not shards:
        raise ConfigError(f"{data_dir}: no {SHARD_GLOB} files in the data folder")
    return shards


def split_shards(data_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """(training shards, validation shard). Needs at least two shards."""
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise ConfigError(f"{data_dir}: need at least 2 shards (the last one is for validation), found {len(shards)}")
    return shards[:-1], shards[-1]


def open_shard(path: str | os.PathLike) -> pq.ParquetFile:
    """Open a shard and check it is a parquet file with a `text` column and at least one row."""
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: shard not found") from None
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: corrupt shard ({e.__class__.__name__}: {e})") from None
    if "text" not in pf.schema_arrow.names:
        raise ConfigError(f"{path}: shard has no 'text' column (columns: {pf.schema_arrow.names})")
    if pf.metadata.num_rows == 0 or pf.num_row_groups == 0:
        raise ConfigError(f"{path}: empty shard (no rows)")
    return pf


def read_row_group(pf: pq.ParquetFile, index: int, path: str | os.PathLike = "") -> list[str]:
    try:
        table = pf.read_row_group(index, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: corrupt row group {index} ({e.__class__.__name__}: {e})") from None
    return [t if t is not None else "" for t in table.column("text").to_pylist()]


def iter_shard_texts(path: str | os.PathLike):
    pf = open_shard(path)
    for i in range(pf.num_row_groups):
        yield from read_row_group(pf, i, path)


def write_shard(path: str | os.PathLike, texts: list[str], row_group_size: int = 256) -> Path:
    """Write one shard atomically (temporary file in the same folder, then rename)."""
    table = pa.table({"text": pa.array(texts, type=pa.string())})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd"))


# -----------------------------------------------------------------------------
# How much text a data folder holds, and how many passes over it a training run makes

def shard_text_bytes(path: str | os.PathLike) -> int:
    """Uncompressed bytes of a shard's `text` column, from the parquet footer (no data read):
    UTF-8 bytes, about one per character of English text."""
    md = open_shard(path).metadata
    total = 0
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            if col.path_in_schema == "text":
                total += col.total_uncompressed_size
    return total


def chars_per_token(tokenizer, shard: str | os.PathLike, max_chars: int = 1_000_000) -> float:
    """The tokenizer's compression on a sample of a shard (its first row groups, up to max_chars)."""
    texts, n = [], 0
    for t in iter_shard_texts(shard):
        texts.append(t)
        n += len(t)
        if n >= max_chars:
            break
    tokens = sum(len(ids) for ids in tokenizer.encode(texts)) if texts else 0
    return n / tokens if tokens else 1.0


def data_epochs_guard(stage: str, data_dir: str | os.PathLike, consumed_tokens: float, data_tokens: float,
                      max_epochs: float, log=print) -> float:
    """Passes a run makes over its data. Over one: a loud warning. Over max_epochs: a ConfigError
    naming the stage and the data folder (repeating a small corpus thousands of times only overfits)."""
    epochs = consumed_tokens / max(data_tokens, 1.0)
    if max_epochs > 0 and epochs > max_epochs:
        raise ConfigError(f"{stage}: would make {epochs:,.0f} epochs over {data_dir} ({consumed_tokens:,.0f} tokens to "
                          f"train on, ~{data_tokens:,.0f} in the data); the limit is max_data_epochs={max_epochs:g}: "
                          "fetch more shards (a `data` stage) or train fewer steps")
    if epochs > 1:
        log(f"WARNING: {stage} will make {epochs:.1f} epochs over {data_dir} ({consumed_tokens:,.0f} tokens to train on, "
            f"~{data_tokens:,.0f} in the data): the model sees the same text {epochs:.1f} times")
    return epochs
