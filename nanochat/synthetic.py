"""
Offline conversation data for mid-training and SFT, generated with a seeded RNG (no downloads):
- arithmetic through the calculator tool: the assistant emits a python part "12*34", the tool's
  python_output part "408", then a text answer
- spelling a word letter by letter, and counting a letter in a word (also via the tool:
  "strawberry".count("r"))
- greetings and identity ("who are you?")
Conversations have a long-tailed number of turns (Pareto): most are a few hundred tokens, a few
are long. The word list comes from the English prose that ships with Python (pydoc's topics).

Also the readers/writers of the conversation format: JSONL of {"messages": [{"role", "content"}]}
(content a string or a list of parts {"type": "text"|"python"|"python_output", "text"}), or parquet
with a `messages` column.
"""
from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.files import atomic_write_text

CHARS_PER_TOKEN = 2.5  # rough size estimate for the length cap (no tokenizer here; small vocabularies ~2.5)


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Lower-case English words of 3-12 letters from pydoc's topic help, sorted (deterministic)."""
    import pydoc_data.topics as topics
    words = set()
    for text in topics.topics.values():
        words.update(re.findall(r"\b[a-z]{3,12}\b", text))
    return tuple(sorted(words))


GREETINGS = ["hi", "hello", "hey there", "good morning", "hi, how are you?", "hello! anyone there?"]
GREETING_REPLIES = ["Hello! How can I help you today?", "Hi! What would you like to do?",
                    "Hey! I'm happy to help with arithmetic, spelling or counting letters."]
IDENTITY_QUESTIONS = ["who are you?", "what is your name?", "what are you?", "who made you?",
                      "are you a person?"]
IDENTITY_REPLIES = [
    "I am nanochat, a small language model trained from scratch on a modest computer budget.",
    "My name is nanochat. I am a small chat model: I can do arithmetic with a calculator tool, "
    "spell words and count letters.",
    "I'm nanochat, a language model, not a person. I was trained by a small team following "
    "Andrej Karpathy's nanochat recipe.",
]
OPS = [("+", "plus", lambda a, b: a + b), ("-", "minus", lambda a, b: a - b), ("*", "times", lambda a, b: a * b)]


def _arithmetic(rng: random.Random) -> tuple[str, list[dict]]:
    sym, word, fn = rng.choice(OPS)
    digits = rng.choice([1, 2, 2, 3, 3, 4])
    a, b = rng.randint(0, 10 ** digits), rng.randint(0, 10 ** digits)
    expr, result = f"{a}{sym}{b}", fn(a, b)
    question = rng.choice([f"What is {a} {word} {b}?", f"Compute {a} {sym} {b}.", f"{a}{sym}{b} = ?",
                           f"Can you tell me what {a} {word} {b} equals?"])
    answer = [{"type": "text", "text": "Let me use the calculator. "},
              {"type": "python", "text": expr},
              {"type": "python_output", "text": str(result)},
              {"type": "text", "text": f"{a} {word} {b} is {result}."}]
    return question, answer


def _spelling(rng: random.Random) -> tuple[str, list[dict]]:
    w = rng.choice(word_list())
    question = rng.choice([f"How do you spell {w}?", f"Spell the word '{w}' letter by letter.",
                           f"Please spell {w}."])
    return question, [{"type": "text", "text": f"{w} is spelled: " + "-".join(w) + "."}]


def _letter_count(rng: random.Random) -> tuple[str, list[dict]]:
    w = rng.choice(word_list())
    letter = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    n = w.count(letter)
    question = rng.choice([f"How many times does the letter '{letter}' appear in '{w}'?",
                           f"Count the {letter}'s in the word {w}."])
    answer = [{"type": "text", "text": f"Spelled out, {w} is " + ",".join(w) + ". Let me count with Python. "},
              {"type": "python", "text": f"'{w}'.count('{letter}')"},
              {"type": "python_output", "text": str(n)},
              {"type": "text", "text": f"The letter '{letter}' appears {n} time{'s' if n != 1 else ''} in '{w}'."}]
    return question, answer


def _greeting(rng: random.Random) -> tuple[str, list[dict]]:
    if rng.random() < 0.5:
        return rng.choice(GREETINGS), [{"type": "text", "text": rng.choice(GREETING_REPLIES)}]
    return rng.choice(IDENTITY_QUESTIONS), [{"type": "text", "text": rng.choice(IDENTITY_REPLIES)}]


TASKS = {"arithmetic": _arithmetic, "spelling": _spelling, "letter_count": _letter_count, "greeting": _greeting}
DEFAULT_WEIGHTS = {"arithmetic": 0.4, "spelling": 0.2, "letter_count": 0.25, "greeting": 0.15}


def _estimate_tokens(question: str, answer: list[dict]) -> int:
    chars = len(question) + sum(len(p["text"]) for p in answer)
    return int(chars / CHARS_PER_TOKEN) + 4 + 2 * len(answer)


def generate_conversations(n: int, seed: int = 0, max_tokens: int = 2048, tail_alpha: float = 1.3,
                           turns_scale: float = 5.0, max_turns: int = 200,
                           weights: dict[str, float] | None = None) -> list[dict]:
    """n conversations, deterministic in (n, seed, ...). The number of user/assistant turns is
    1 + floor(turns_scale * (Pareto(tail_alpha) - 1)) (a smaller tail_alpha -> a heavier tail),
    capped by max_turns and by an estimated max_tokens, so most conversations are a few hundred
    tokens and a few reach the cap."""
    if n < 0 or tail_alpha <= 0 or turns_scale < 0 or max_tokens <= 0:
        raise ConfigError(f"generate_conversations: bad arguments n={n} tail_alpha={tail_alpha} "
                          f"turns_scale={turns_scale} max_tokens={max_tokens}")
    weights = weights or DEFAULT_WEIGHTS
    unknown = set(weights) - set(TASKS)
    if unknown:
        raise ConfigError(f"generate_conversations: unknown task(s) {sorted(unknown)}; known: {sorted(TASKS)}")
    names = sorted(weights)
    w = [weights[k] for k in names]
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        turns = 1 + int(turns_scale * (rng.paretovariate(tail_alpha) - 1))
        turns = min(turns, max_turns)
        messages, tokens = [], 1
        for t in range(turns):
            task = TASKS[rng.choices(names, weights=w)[0]]
            question, answer = task(rng)
            cost = _estimate_tokens(question, answer)
            if t > 0 and tokens + cost > max_tokens:
                break
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
            tokens += cost
        convs.append({"messages": messages})
    return convs


# -----------------------------------------------------------------------------
# Writing (reading, with the schema check, is nanochat.conversations)

def write_jsonl(path: str | Path, convs: list[dict]) -> Path:
    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs))
    return path
