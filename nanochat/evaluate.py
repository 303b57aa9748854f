"""
Evaluation: the model's report card, scored for the stage kinds base_eval and chat_eval (their configs
and entry points: nanochat.recipes.base_eval, nanochat.recipes.chat_eval).

- base_eval (after base or mid training): the CORE metric, the in-context tasks of DCLM's bundle
  scored by completion likelihood (nanochat/tasks/core.py), centered on each task's random baseline.
- chat_eval (after SFT): ARC-Easy, ARC-Challenge, MMLU (the letter's logit), GSM8K (generated with
  the engine and its calculator, the final number), HumanEval (generated code run in the sandbox),
  combined as ChatCORE: the mean over tasks of (accuracy - chance) / (1 - chance), chance 1/4 for
  the multiple-choice sets and 0 for the generative ones, as nanochat combines them.
  HumanEval runs only where nanochat.sandbox can isolate model code (every rank); elsewhere its row
  is SKIPPED with the one-line reason, the other tasks run, and ChatCORE is over those that ran,
  unless allow_unsafe_code. Its rows name the isolation that scored them (`isolation`).

Distributed: with several ranks (torchrun or Slurm tasks) each rank takes every world_size-th
example and the per-task counts are summed with torch.distributed; every rank returns the same rows.
Each task gives one result dict (a result row: variant = the task): accuracy, num_examples,
eval_seconds, examples_per_s, and for generative tasks pass@1 and pass@k over num_samples samples.
With compare_broadcast the generative tasks run a second time with the engine's broadcast
first-token baseline (variant "<task>.broadcast"): the first-token fix measured as quality.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable

import torch

from nanochat.device import autodetect_device_type, device_name
from nanochat.distributed import compute_cleanup, compute_init
from nanochat.errors import ConfigError

if TYPE_CHECKING:
    from nanochat.recipes.base_eval import BaseEvalConfig
    from nanochat.recipes.chat_eval import ChatEvalConfig

CHAT_TASKS = ("arc_easy", "arc_challenge", "mmlu", "gsm8k", "humaneval")
GENERATIVE = ("gsm8k", "humaneval")


def _reduce(values: list[float], ddp: bool, op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def _row(task: str, correct: float, n: int, seconds: float, info, model, **extra) -> dict:
    acc = correct / n if n else None
    return {"variant": task, "task": task, "accuracy": acc, "num_examples": n, "eval_seconds": seconds,
            "examples_per_s": n / seconds if seconds > 0 and n else None, "wall_time_s": seconds,
            "world_size": info.world_size, "device_name": device_name(info.device),
            "depth": model.config.n_layer, "n_params": model.num_params(), "state": "COMPLETED", **extra}


def _load(cfg, info):
    from nanochat.checkpoint import load_model
    from nanochat.engine import prepare_for_inference
    if not cfg.init_from:
        raise ConfigError("init_from: a checkpoint folder to evaluate is required")
    model, tokenizer, meta = load_model(cfg.init_from, info.device)
    prepare_for_inference(model)
    return model, tokenizer, meta


def _limit(examples: list, cfg) -> list:
    return examples[:cfg.max_per_task] if cfg.max_per_task > 0 else examples


# -----------------------------------------------------------------------------
# base_eval: CORE

def run_base_eval(cfg: BaseEvalConfig, info, model, tokenizer) -> list[dict]:
    from nanochat.tasks import core
    from nanochat.tasks.common import resolve_data_dir
    suite = core.load_suite(resolve_data_dir(cfg.data_dir, cfg.base_dir) / "eval_bundle")
    rows = []
    for task in suite:
        task["records"] = _limit(task["records"], cfg)
        t0 = time.perf_counter()
        mine = range(info.rank, len(task["records"]), info.world_size)
        correct = sum(core.score_example(model, tokenizer, task, i) for i in mine)
        correct, n = _reduce([correct, len(mine)], info.ddp)
        seconds = _reduce([time.perf_counter() - t0], info.ddp, "max")[0]
        row = _row(task["label"], correct, int(n), seconds, info, model, random_baseline=task["random_baseline"] / 100)
        row["centered"] = core.centered(row["accuracy"], task["random_baseline"])
        rows.append(row)
    total = sum(r["eval_seconds"] for r in rows)
    rows.append(_row("CORE", 0, 0, total, info, model, accuracy=None,
                     centered=sum(r["centered"] for r in rows) / len(rows), num_examples=sum(r["num_examples"] for r in rows)))
    return rows


# -----------------------------------------------------------------------------
# chat_eval

@torch.no_grad()
def _multiple_choice(examples, model, tokenizer, cfg, info) -> float:
    from nanochat.tasks import multiple_choice as mc
    device = model.get_device()
    mine = examples[info.rank::info.world_size]
    correct = 0
    for start in range(0, len(mine), cfg.batch_size):
        batch = mine[start:start + cfg.batch_size]
        prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": mc.render_prompt(e)}]})
                   for e in batch]
        max_len = model.config.sequence_len
        prompts = [p[-max_len:] for p in prompts]
        T = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), T, dtype=torch.long, device=device)   # right padding: causal, never seen
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, device=device)
        logits = model(ids)
        for i, (e, p) in enumerate(zip(batch, prompts)):
            letter_ids = mc.letter_token_ids(tokenizer, e["letters"])
            choice = int(logits[i, len(p) - 1, letter_ids].argmax())
            correct += int(choice == e["answer"])
    return correct


def _generative(task: str, examples, engine, tokenizer, cfg, info, first_token: str) -> tuple[float, float, int]:
    """(sum of per-problem pass@1, sum of per-problem pass@k, problems) on this rank."""
    from nanochat.tasks import gsm8k, humaneval
    pass1 = passk = 0.0
    mine = list(range(info.rank, len(examples), info.world_size))
    max_len = engine.model.config.sequence_len
    for i in mine:
        e = examples[i]
        content = e["question"] if task == "gsm8k" else humaneval.render_prompt(e)
        prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": content}]})
        prompt = prompt[-(max_len // 2):]
        room = min(cfg.max_new_tokens, max_len - len(prompt))
        samples, _ = engine.generate_batch(prompt, num_samples=cfg.num_samples, max_tokens=room,
                                           temperature=cfg.temperature, top_k=cfg.top_k or None,
                                           seed=cfg.seed + i, first_token=first_token)
        texts = [tokenizer.decode(s[len(prompt):]) for s in samples]
        if task == "gsm8k":
            ok = [gsm8k.is_correct(e, t) for t in texts]
        else:
            ok = [humaneval.score_completion(e, t, timeout_s=cfg.sandbox_timeout_s, allow_unsafe=cfg.allow_unsafe_code)
                  for t in texts]
        pass1 += sum(ok) / len(ok)      # unbiased pass@1 from n samples: c / n
        passk += float(any(ok))
    return pass1, passk, len(mine)


def _load_chat_task(task: str, data_dir):
    from nanochat.tasks import gsm8k, humaneval, multiple_choice
    from nanochat.tasks.common import find_task_file
    path = find_task_file(data_dir, task)
    if task in multiple_choice.FILES:
        return multiple_choice.load(path)
    return gsm8k.load(path) if task == "gsm8k" else humaneval.load(path)


def _code_isolation(cfg: ChatEvalConfig, info) -> tuple[str, str | None]:
    """(isolation label, refusal) for HumanEval, the same on every rank: one rank without a
    sandbox refuses it everywhere, as the ranks' counts are summed together."""
    from nanochat import sandbox
    iso = sandbox.isolation()
    missing = _reduce([float(iso.kind == "none")], info.ddp)[0]
    if not missing:
        return iso.label, None
    if cfg.allow_unsafe_code:
        return sandbox.UNSAFE, None
    reason = iso.reason if iso.kind == "none" else f"{int(missing)} of {info.world_size} ranks have no sandbox"
    return "none", f"humaneval not run: {reason} (or allow_unsafe_code: true to run model code unisolated)"


def run_chat_eval(cfg: ChatEvalConfig, info, model, tokenizer) -> list[dict]:
    from nanochat.engine import Engine
    from nanochat.tasks.common import resolve_data_dir
    for key, message in cfg.check_args(vars(cfg)):
        raise ConfigError(f"{key}: {message}")
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    data_dir = resolve_data_dir(cfg.data_dir, cfg.base_dir)
    data = {t: _limit(_load_chat_task(t, data_dir), cfg) for t in tasks}   # all read before any work
    isolation, refused = _code_isolation(cfg, info) if "humaneval" in tasks else (None, None)
    if refused and info.rank == 0:
        print(refused, file=sys.stderr, flush=True)
    engine = Engine(model, tokenizer)
    rows = []
    for task in tasks:
        examples = data[task]
        if task == "humaneval" and refused:
            rows.append(_row(task, 0, 0, 0.0, info, model, accuracy=None, state="SKIPPED", error=refused,
                             isolation=isolation))
            continue
        modes = [cfg.first_token]
        if task in GENERATIVE and cfg.compare_broadcast and "broadcast" not in modes:
            modes.append("broadcast")
        for mode in modes:
            t0 = time.perf_counter()
            if task in GENERATIVE:
                p1, pk, n = _generative(task, examples, engine, tokenizer, cfg, info, mode)
                p1, pk, n = _reduce([p1, pk, n], info.ddp)
                seconds = _reduce([time.perf_counter() - t0], info.ddp, "max")[0]
                row = _row(task, pk if cfg.num_samples > 1 else p1, int(n), seconds, info, model,
                           pass_at_1=p1 / n if n else None, pass_at_k=pk / n if n else None, k=cfg.num_samples,
                           first_token=mode, temperature=cfg.temperature)
                if mode != cfg.first_token:
                    row["variant"] = f"{task}.{mode}"
                if task == "humaneval":
                    row["isolation"] = isolation
                # the first-token fix only changes anything when several samples are drawn
                chance = 0.0
            else:
                c = _multiple_choice(examples, model, tokenizer, cfg, info)
                c, n = _reduce([c, len(examples[info.rank::info.world_size])], info.ddp)
                seconds = _reduce([time.perf_counter() - t0], info.ddp, "max")[0]
                chance = sum(1 / len(e["choices"]) for e in examples) / max(1, len(examples))
                row = _row(task, c, int(n), seconds, info, model)
            row["chance"] = chance
            row["centered"] = (row["accuracy"] - chance) / (1 - chance) if row["accuracy"] is not None else None
            rows.append(row)
    main = [r for r in rows if r["variant"] in tasks and r["state"] == "COMPLETED"]
    rows.append(_row("ChatCORE", 0, 0, sum(r["eval_seconds"] for r in main), info, model, accuracy=None,
                     num_examples=sum(r["num_examples"] for r in main), tasks=",".join(r["task"] for r in main),
                     centered=sum(r["centered"] for r in main) / len(main) if main else None))
    return rows


def run_eval(cfg: BaseEvalConfig | ChatEvalConfig, score: Callable) -> list[dict]:
    """Both stage kinds' run (docs/CONTRACTS.md): load the checkpoint, score(cfg, info, model, tokenizer)
    gives one result dict per task, then the combined metric (CORE or ChatCORE, in `centered`)."""
    info = compute_init(cfg.device_type or autodetect_device_type())
    try:
        model, tokenizer, meta = _load(cfg, info)
        rows = score(cfg, info, model, tokenizer)
        for r in rows:
            r["checkpoint"] = meta.get("path")
            r["seq_len"] = model.config.sequence_len
        return rows
    finally:
        compute_cleanup()
