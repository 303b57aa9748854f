"""
Conversation sets for mid-training and SFT, as nanochat mixes them, fetched from the hub once and
converted into the project's conversations format (JSONL of {"messages": [{"role", "content"}]}):

    smoltalk  HuggingFaceTB/smol-smoltalk, data/train (~460K general chats; optional system message)
    mmlu      cais/mmlu, all/auxiliary_train (~100K multiple-choice questions)
    gsm8k     openai/gsm8k, main/train (~7.5K grade-school math; <<expr=result>> become calculator calls)

    <base_dir>/data/hub/<owner>--<name>/...parquet   the verified hub files (nanochat.fetch.fetch_split)
    <base_dir>/data/chat/<set>.jsonl                 the converted set (written atomically, once)

A stage's `data_path` may name a mixture, "smoltalk+mmlu+gsm8k", of set names and file paths
(JSONL or parquet): read_mixture resolves names to the converted files, offline, and names the
missing file when a set was not fetched.
The splits and their pinned commits are nanochat.fetch.HUB_SPLITS (the splits nanochat's chat_sft.py
trains on); the file names come from the hub's own listing of each split's folder.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path


from nanochat.errors import ConfigError
from nanochat.files import atomic_write_text
from nanochat.conversations import check_conversation_file, read_conversations
from nanochat.fetch import HUB_SPLITS, HubSplit, fetch_split, split_files
from nanochat.locking import file_lock


@dataclass(frozen=True)
class ChatSet:
    name: str
    split: HubSplit
    note: str

    @property
    def approx_rows(self) -> int:
        return self.split.rows


CHAT_SETS: dict[str, ChatSet] = {
    "smoltalk": ChatSet("smoltalk", HUB_SPLITS["smoltalk/train"],
                        "general conversations (nanochat's mid-training and SFT mixtures)"),
    "mmlu": ChatSet("mmlu", HUB_SPLITS["mmlu/auxiliary_train"],
                    "multiple choice, answered with a letter (mid-training)"),
    "gsm8k": ChatSet("gsm8k", HUB_SPLITS["gsm8k/train"],
                     "grade-school math with calculator tool calls (mid-training and SFT)"),
}
LETTERS = ("A", "B", "C", "D")


def chat_set(name: str) -> ChatSet:
    if name not in CHAT_SETS:
        raise ConfigError(f"{name}: unknown conversation set (known: {', '.join(CHAT_SETS)}; or a .jsonl/.parquet path)")
    return CHAT_SETS[name]


def converted_path(base_dir, name: str) -> Path:
    return Path(base_dir) / "data" / "chat" / f"{name}.jsonl"


# -----------------------------------------------------------------------------
# Row converters: one hub row -> one conversation (or None to skip a malformed row)

def smoltalk_conversation(row: dict) -> dict | None:
    messages = row.get("messages") or []
    rest = messages[1:] if messages and messages[0].get("role") == "system" else messages
    if len(rest) < 2:
        return None
    for i, m in enumerate(rest):  # user and assistant alternate, text content only
        if m.get("role") != ("user" if i % 2 == 0 else "assistant") or not isinstance(m.get("content"), str):
            return None
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}


def mmlu_conversation(row: dict) -> dict | None:
    row = row.get("train", row)  # the repo's own auxiliary_train config wraps each row in a `train` struct
    choices, answer = row.get("choices") or [], row.get("answer")
    if len(choices) != len(LETTERS) or not isinstance(answer, int) or not 0 <= answer < len(LETTERS):
        return None
    lines = [f"Multiple Choice question: {row['question']}"]
    lines += [f"- {c}={letter}" for letter, c in zip(LETTERS, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return {"messages": [{"role": "user", "content": "\n".join(lines)},
                         {"role": "assistant", "content": LETTERS[answer]}]}


_CALC = re.compile(r"<<([^>]*)>>")


def gsm8k_conversation(row: dict) -> dict | None:
    """The solution's <<expr=result>> annotations become a python call and its output, as the
    calculator tool of the chat format expects; the text between them stays text."""
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        return None
    parts, pos = [], 0
    for m in _CALC.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        expr, _, result = m.group(1).rpartition("=") if "=" in m.group(1) else (m.group(1), "", "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}]}


CONVERTERS = {"smoltalk": smoltalk_conversation, "mmlu": mmlu_conversation, "gsm8k": gsm8k_conversation}


# -----------------------------------------------------------------------------

def ensure_chat_set(base_dir, name: str, workers: int = 4, retries: int = 5, backoff_s: float = 1.0,
                    log=print) -> dict:
    """Fetch a set's hub files (no network when they are present) and convert them once. Returns
    {"set", "path", "conversations", "skipped", "fetch": the fetch summary}."""
    import pyarrow.parquet as pq
    cs = chat_set(name)
    out = converted_path(base_dir, name)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out.with_suffix(".json")
    summary = fetch_split(base_dir, cs.split, workers=workers, retries=retries, backoff_s=backoff_s, log=log)
    with file_lock(str(out) + ".lock"):
        if out.is_file() and done.is_file():
            return {**json.loads(done.read_text()), "fetch": summary}
        convert, lines, skipped, chars = CONVERTERS[name], [], 0, 0
        files = split_files(base_dir, cs.split)
        for f in files:
            for row in pq.read_table(f).to_pylist():
                conv = convert(row)
                if conv is None:
                    skipped += 1
                else:
                    lines.append(json.dumps(conv, ensure_ascii=False))
                    chars += conversation_chars(conv)
        if not lines:
            raise ConfigError(f"{files[0].parent}: no usable rows in {cs.split.repo_id} {cs.split.key}")
        atomic_write_text(out, "\n".join(lines) + "\n")
        info = {"set": name, "path": str(out), "conversations": len(lines), "skipped": skipped, "chars": chars}
        atomic_write_text(done, json.dumps(info) + "\n")
    log(f"[data] {name}: {len(lines)} conversations -> {out} ({skipped} malformed rows skipped)")
    return {**info, "fetch": summary}


def conversation_chars(conv: dict) -> int:
    """Characters of text in a conversation (string contents and the text of parts)."""
    total = 0
    for m in conv.get("messages") or []:
        content = m.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def mixture_chars(spec: str, base_dir) -> int | None:
    """Characters of text a mixture holds, from the conversion records of its sets and the sizes of
    the user's files (an upper bound: JSON adds its syntax); None while a set is not converted yet."""
    total = 0
    for part, count in mixture_parts(spec):
        if part in CHAT_SETS:
            done = converted_path(base_dir, part).with_suffix(".json")
            try:
                info = json.loads(done.read_text())
            except (OSError, ValueError):
                return None
            if "chars" not in info:
                return None
            share = min(1.0, count / info["conversations"]) if count and info.get("conversations") else 1.0
            total += int(info["chars"] * share)
        elif Path(part).is_file():
            total += Path(part).stat().st_size
    return total


def mixture_parts(spec: str) -> list[tuple[str, int]]:
    """'smoltalk:10000+mmlu+gsm8k' -> [('smoltalk', 10000), ('mmlu', 0), ('gsm8k', 0)] (0: all of it,
    N: the first N after a seeded shuffle, like nanochat's SmolTalk(stop=10_000)); a path that exists stays whole."""
    if not spec or Path(spec).exists():
        return [(spec, 0)] if spec else []
    parts = []
    for p in (p.strip() for p in spec.split("+")):
        name, _, count = p.rpartition(":") if p.rpartition(":")[2].isdigit() else (p, "", "0")
        if name:
            parts.append((name, int(count)))
    return parts


def mixture_files(spec: str, base_dir) -> list[Path]:
    """The files a mixture reads: converted sets (checked offline) and the user's own files."""
    files = []
    for part, _ in mixture_parts(spec):
        if part in CHAT_SETS:
            path = converted_path(base_dir, part)
            if not path.is_file():
                raise ConfigError(f"{path}: missing; fetch it where the network is: python -m jobs data fetch {part} "
                                  "(or list it in a `data` stage's conversations)")
            files.append(path)
        else:
            files.append(Path(part))
    return files


def check_mixture(spec: str) -> None:
    """Submit-time check of a data_path: the user's own files of a mixture are read and checked line by
    line (nanochat.conversations, the loaders' own check); hub sets are made later by the data stage
    and checked, offline, when the stage that reads them starts."""
    for part, _ in mixture_parts(spec):
        if part not in CHAT_SETS:
            check_conversation_file(part)


def read_mixture(spec: str, base_dir, seed: int = 0) -> list[dict]:
    """All conversations of a mixture, shuffled together with the seed (files as read_conversations reads them)."""
    convs: list[dict] = []
    parts = mixture_parts(spec)
    for path, (_, count) in zip(mixture_files(spec, base_dir), parts):
        these = read_conversations(path)
        if count:
            random.Random(seed).shuffle(these)
            these = these[:count]
        convs += these
    if len(parts) > 1:
        random.Random(seed).shuffle(convs)
    return convs


__all__ = ["CHAT_SETS", "chat_set", "ensure_chat_set", "read_mixture", "check_mixture", "mixture_files", "mixture_parts",
           "converted_path", "conversation_chars", "mixture_chars", "smoltalk_conversation", "mmlu_conversation",
           "gsm8k_conversation"]
