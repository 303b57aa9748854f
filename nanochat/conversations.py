"""
Conversation files (SFT and mid-training data): reading them and the one check of their schema.

A file is JSONL (one {"messages": [...]} object per line) or parquet (a `messages` column of
structs, or of JSON strings). A conversation is what Tokenizer.render_conversation accepts:
- an optional leading system message (string content), which must be followed by a user message;
- then roles alternating user, assistant, user, ... starting with user;
- user content a string; assistant content a string or a list of {type, text} parts with type
  text, python or python_output and string text.

The same check runs when `submit` validates a pipeline (jobs/spec.py) and when the stage loads the
file, so both name the same place: `path:LINE: ...` for JSONL (1-based line numbers, blank lines
counted), `path: row N: ...` for parquet (1-based). Reading streams line by line, so validating a
large file at submit time holds one line at a time.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from nanochat.errors import ConfigError

PART_TYPES = ("text", "python", "python_output")


def conversation_problem(obj) -> str | None:
    """Why `obj` is not a conversation the tokenizer can render, or None when it is.
    Message numbers in the answer are 1-based, like line numbers."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with a 'messages' list, got {type(obj).__name__}"
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return "expected an object with a non-empty 'messages' list"
    for j, m in enumerate(messages, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {j} needs 'role' and 'content'"
    offset = 0
    if messages[0]["role"] == "system":
        if not isinstance(messages[0]["content"], str):
            return "message 1 (system) content must be a string"
        if len(messages) < 2 or messages[1]["role"] != "user":
            return "a system message must be followed by a user message"
        offset = 1
    for j, m in enumerate(messages[offset:], offset + 1):
        role, content = m["role"], m["content"]
        expected = "user" if (j - offset) % 2 == 1 else "assistant"
        if role != expected:
            return f"message {j} has role {role!r}, expected {expected!r} (roles alternate, user first)"
        if role == "user":
            if not isinstance(content, str):
                return f"message {j} (user) content must be a string"
        elif not isinstance(content, str):
            if not isinstance(content, list):
                return f"message {j} (assistant) content must be a string or a list of {{type, text}} parts"
            for k, part in enumerate(content, 1):
                if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                    return (f"message {j} (assistant) part {k} must be {{type, text}} with type one of "
                            f"{', '.join(PART_TYPES)} and string text")
    return None


def _parquet_rows(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        if "messages" not in pf.schema_arrow.names:
            raise ConfigError(f"{path}: no 'messages' column (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=["messages"]):
            for msgs in batch.column(0).to_pylist():
                row += 1
                where = f"{path}: row {row}"
                if isinstance(msgs, str):
                    try:
                        msgs = json.loads(msgs)
                    except ValueError as e:
                        raise ConfigError(f"{where}: invalid JSON in 'messages' ({e})") from None
                if isinstance(msgs, list):
                    for m in msgs:
                        if isinstance(m, dict) and isinstance(m.get("content"), list):
                            # parquet structs carry every field of the union; drop the empty ones
                            m["content"] = [{k: v for k, v in p.items() if v is not None} if isinstance(p, dict) else p
                                            for p in m["content"]]
                yield where, {"messages": msgs}
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"{path}: corrupt parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def jsonl_lines(path: Path) -> Iterator[tuple[str, object]]:
    """("<path>:<line>", the line's JSON value) for each non-blank line of a JSONL file; a line that
    is not UTF-8 or not JSON, or a file that cannot be read, is a ConfigError naming it. The one
    JSONL reader of the library's data files (conversations here, task sets in nanochat/tasks)."""
    try:
        f = open(path, "rb")  # bytes, decoded line by line: a bad byte is named by its own line
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({e})") from None
            yield f"{path}:{lineno}", obj


def iter_conversations(path: str | os.PathLike) -> Iterator[dict]:
    """The conversations of a JSONL or parquet file, each checked; the first bad one is a
    ConfigError naming the file and its 1-based line (or row)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: conversation file not found")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else jsonl_lines(path)
    for where, obj in rows:
        problem = conversation_problem(obj)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        yield obj


def read_conversations(path: str | os.PathLike) -> list[dict]:
    """All conversations of the file (the stage loaders), validated as check_conversation_file does."""
    convs = list(iter_conversations(path))
    if not convs:
        raise ConfigError(f"{path}: no conversations")
    return convs


def check_conversation_file(path: str | os.PathLike) -> int:
    """Validate a conversation file without keeping it in memory (submit time). Returns the count."""
    n = sum(1 for _ in iter_conversations(path))
    if n == 0:
        raise ConfigError(f"{path}: no conversations")
    return n
