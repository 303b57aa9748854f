"""The CORE metric's in-context tasks (DCLM's eval bundle, as nanochat evaluates its base model).

Layout as the bundle ships it: <data_dir>/eval_bundle/core.yaml (icl_tasks: label, dataset_uri,
num_fewshot, icl_task_type, continuation_delimiter), eval_meta_data.csv ("Eval Task",
"Random baseline" in percent) and eval_data/<dataset_uri> (JSONL). Three task types:
- multiple_choice {query, choices, gold}: one context, several continuations; the answer is the
  continuation with the lowest mean loss per token.
- schema {context_options, continuation, gold}: several contexts, one continuation; lowest mean loss.
- language_modeling {context, continuation}: right when greedy prediction reproduces every token of
  the continuation.
Few-shot examples (other items of the same task, drawn with a per-item seed) precede each item.
A task's accuracy is centered on its random baseline, (acc - b) / (1 - b), and CORE is the mean."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from nanochat.errors import ConfigError
from nanochat.tasks.common import load_records, require

TYPES = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
         "language_modeling": ("context", "continuation")}


def load_suite(bundle: Path) -> list[dict]:
    """The tasks of core.yaml with their random baselines and records."""
    spec_path = bundle / "core.yaml"
    if not spec_path.is_file():
        raise ConfigError(f"{spec_path}: CORE task list not found (the eval bundle's core.yaml); fetch it where the "
                          "network is (a data stage's evals: [core], or python -m jobs data fetch --evals core)")
    try:
        spec = yaml.safe_load(spec_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{spec_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    baselines = {}
    meta = bundle / "eval_meta_data.csv"
    if meta.is_file():
        with open(meta, newline="") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"])
    tasks = []
    for i, t in enumerate(spec.get("icl_tasks") or []):
        where = f"{spec_path}: icl_tasks[{i}]"
        for key in ("label", "dataset_uri", "icl_task_type"):
            if key not in t:
                raise ConfigError(f"{where} lacks key {key!r}")
        kind = t["icl_task_type"]
        if kind not in TYPES:
            raise ConfigError(f"{where}.icl_task_type: unknown {kind!r}; known: {', '.join(TYPES)}")
        shots = t.get("num_fewshot", [0])
        data_path = bundle / "eval_data" / t["dataset_uri"]
        if not data_path.is_file():
            raise ConfigError(f"{data_path}: data of CORE task {t['label']} not found")
        records = load_records(data_path)
        for j, r in enumerate(records):
            require(r, TYPES[kind], data_path, j)
        tasks.append({"label": t["label"], "type": kind, "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                      "delimiter": t.get("continuation_delimiter", " "), "records": records,
                      "random_baseline": baselines.get(t["label"], 0.0)})
    if not tasks:
        raise ConfigError(f"{spec_path}: no icl_tasks")
    return tasks


def centered(accuracy: float, random_baseline_percent: float) -> float:
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def _fewshot(task: dict, index: int) -> list[dict]:
    n = min(task["num_fewshot"], len(task["records"]) - 1)
    if n <= 0:
        return []
    rng = random.Random(1234 + index)
    others = [i for i in range(len(task["records"])) if i != index]
    return [task["records"][i] for i in rng.sample(others, n)]


def render(task: dict, index: int) -> tuple[list[str], list[str]]:
    """(contexts, continuations) as text, one pair per candidate (one pair for language modeling)."""
    d = task["delimiter"]
    r = task["records"][index]
    shots = _fewshot(task, index)
    kind = task["type"]
    if kind == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [prefix + r["query"] + d] * len(r["choices"]), list(r["choices"])
    if kind == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [prefix + c + d for c in r["context_options"]], [r["continuation"]] * len(r["context_options"])
    prefix = "".join(f"{s['context']}{d}{s['continuation']}\n\n" for s in shots)
    return [prefix + r["context"] + d], [r["continuation"]]


def _tokenize(tokenizer, context: str, continuation: str, max_len: int) -> tuple[list[int], int]:
    """BOS + context + continuation, cropped on the left to max_len; returns (ids, start of the
    continuation). The continuation starts where the tokens of context and context+continuation
    stop agreeing (the tokenizer may merge across the boundary)."""
    bos = tokenizer.get_bos_token_id()
    ctx = [bos] + tokenizer.encode(context)
    full = [bos] + tokenizer.encode(context + continuation)
    start = 0
    while start < min(len(ctx), len(full)) and ctx[start] == full[start]:
        start += 1
    start = min(start, len(full) - 1)
    if len(full) > max_len:
        cut = len(full) - max_len
        full, start = full[cut:], max(1, start - cut)
    return full, start


@torch.no_grad()
def score_example(model, tokenizer, task: dict, index: int) -> bool:
    contexts, continuations = render(task, index)
    max_len = model.config.sequence_len
    rows = [_tokenize(tokenizer, c, x, max_len) for c, x in zip(contexts, continuations)]
    T = max(len(ids) for ids, _ in rows)
    device = model.get_device()
    batch = torch.zeros(len(rows), T, dtype=torch.long, device=device)    # right padding is never attended to
    for i, (ids, _) in enumerate(rows):
        batch[i, :len(ids)] = torch.tensor(ids, device=device)
    logits = model(batch).float()
    logprobs = F.log_softmax(logits[:, :-1], dim=-1)
    targets = batch[:, 1:]
    if task["type"] == "language_modeling":
        ids, start = rows[0]
        predicted = logits[0, start - 1:len(ids) - 1].argmax(dim=-1)
        return bool((predicted == targets[0, start - 1:len(ids) - 1]).all())
    losses = []
    for i, (ids, start) in enumerate(rows):
        span = slice(start - 1, len(ids) - 1)
        losses.append(-logprobs[i, span].gather(-1, targets[i, span, None]).mean().item())
    return min(range(len(losses)), key=losses.__getitem__) == int(task["records"][index]["gold"])
