"""GSM8K (openai/gsm8k: question, answer). The reference answer is worked text with calculator
annotations <<48/2=24>> and ends with "#### <number>". The chat model answers in the same style and
may call the calculator (the engine runs it); the answer is right when the number after its last
"####" equals the reference's, as nanochat scores it (commas dropped)."""
from __future__ import annotations

import re
from pathlib import Path

from nanochat.tasks.common import load_records, require

ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_answer(text: str) -> str | None:
    found = ANSWER_RE.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def load(path: Path) -> list[dict]:
    out = []
    for i, r in enumerate(load_records(path)):
        require(r, ("question", "answer"), path, i)
        out.append({"question": r["question"], "answer": r["answer"], "target": extract_answer(r["answer"])})
    return out


def is_correct(example: dict, completion: str) -> bool:
    got = extract_answer(completion)
    return got is not None and got == example["target"]
