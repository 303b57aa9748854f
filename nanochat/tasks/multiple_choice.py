"""Multiple choice for the chat model: ARC-Easy, ARC-Challenge (allenai/ai2_arc: question,
choices {text, label}, answerKey) and MMLU (cais/mmlu: question, subject, choices, answer index).

Scoring as nanochat's chat eval does it: the question and its lettered choices are the user's
message, the assistant turn is opened, and the model's answer is the letter whose token has the
highest logit at that position (among the choices' letters only). Chance is 1 / number of choices."""
from __future__ import annotations

from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.tasks.common import load_records, require

LETTERS = "ABCDEFGHIJ"
FILES = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "mmlu": "mmlu"}


def normalise(record: dict, path: Path, index: int) -> dict:
    """-> {"question", "choices": [str], "letters": [str], "answer": int}."""
    if "answerKey" in record:       # ARC
        require(record, ("question", "choices"), path, index)
        labels, texts = list(record["choices"]["label"]), list(record["choices"]["text"])
        key = str(record["answerKey"])
        if key not in labels:
            raise ConfigError(f"{path}: record {index}: answerKey {key!r} not among labels {labels}")
        # some ARC items are labelled 1-4: show letters to the model all the same
        return {"question": record["question"], "choices": texts, "letters": list(LETTERS[:len(texts)]),
                "answer": labels.index(key)}
    require(record, ("question", "choices", "answer"), path, index)   # MMLU
    choices = list(record["choices"])
    answer = int(record["answer"])
    if not 0 <= answer < len(choices):
        raise ConfigError(f"{path}: record {index}: answer {answer} out of range")
    return {"question": record["question"], "choices": choices, "letters": list(LETTERS[:len(choices)]),
            "answer": answer}


def load(path: Path) -> list[dict]:
    return [normalise(r, path, i) for i, r in enumerate(load_records(path))]


def render_prompt(example: dict) -> str:
    lines = [f"Multiple Choice question: {example['question']}"]
    lines += [f"- {choice}={letter}" for choice, letter in zip(example["choices"], example["letters"])]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        enc = tokenizer.encode(letter)
        if len(enc) != 1:
            raise ConfigError(f"tokenizer: letter {letter!r} is not a single token")
        ids.append(enc[0])
    return ids
