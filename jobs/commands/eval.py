"""
`python -m jobs eval CHECKPOINT --tasks ...`: a checkpoint's report card, outside a pipeline.

    python -m jobs eval <workdir>/<run>/sft/checkpoints --tasks arc_easy,mmlu,gsm8k --data-dir fixtures
    python -m jobs eval <workdir>/<run>/base_train/checkpoints --tasks core
    torchrun --nproc_per_node 2 -m jobs eval CKPT --tasks humaneval     (each rank a slice)

--tasks core runs the base-model CORE suite (nanochat.recipes.base_eval.BaseEvalConfig); any of arc_easy,
arc_challenge, mmlu, gsm8k, humaneval run the chat evaluation. Prints one line per task (accuracy,
examples, seconds, examples/s) and, with --json, the rows as one JSON object on the last line.
Exit 1 when a task was not run (HumanEval where no sandbox can be made: the one-line reason is on
stderr; --allow-unsafe-code runs it anyway).
"""
from __future__ import annotations

import argparse
import json

from nanochat.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint step folder, or a checkpoints folder (its newest step)")
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,mmlu,gsm8k,humaneval",
                        help="core, or a comma-separated list of arc_easy,arc_challenge,mmlu,gsm8k,humaneval")
    parser.add_argument("--data-dir", default="", help="task files folder; 'fixtures' = the repository's small sets "
                                                       "(default: <base_dir>/eval_data)")
    parser.add_argument("--max-per-task", type=int, default=0, help="examples per task (0 = all)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--first-token", choices=["independent", "broadcast"], default="independent")
    parser.add_argument("--compare-broadcast", action="store_true",
                        help="also run the generative tasks with the broadcast first-token baseline")
    parser.add_argument("--allow-unsafe-code", action="store_true",
                        help="run HumanEval's model code even where no sandbox can be made (bubblewrap missing)")
    parser.add_argument("--device", default="", help="cpu, cuda or mps (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args: argparse.Namespace) -> int:
    from nanochat.recipes import base_eval, chat_eval
    if args.max_per_task < 0:
        raise ConfigError(f"--max-per-task {args.max_per_task}: must be >= 0")
    common = dict(data_dir=args.data_dir, max_per_task=args.max_per_task, init_from=args.checkpoint,
                  device_type=args.device)
    if args.tasks.strip() == "core":
        cfg = base_eval.BaseEvalConfig(**common)
        recipe = base_eval
    else:
        recipe = chat_eval
        cfg = chat_eval.ChatEvalConfig(tasks=args.tasks, num_samples=args.num_samples, temperature=args.temperature,
                                      max_new_tokens=args.max_new_tokens, first_token=args.first_token,
                                      compare_broadcast=args.compare_broadcast,
                                      allow_unsafe_code=args.allow_unsafe_code, **common)
    rows = recipe.run(cfg)
    print(format_rows(rows), flush=True)
    skipped = [r["error"] for r in rows if r.get("state") == "SKIPPED"]
    if args.json:
        print(json.dumps({"rows": rows, **({"error": skipped[0], "exit_code": 1} if skipped else {})}, default=str),
              flush=True)
    return 1 if skipped else 0   # a task asked for was not run (the recipe printed why)


def format_rows(rows: list[dict]) -> str:
    def f(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))
    lines = [f"{'task':<22} {'accuracy':>8} {'centered':>8} {'pass@1':>7} {'pass@k':>7} {'n':>5} {'seconds':>8} {'ex/s':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<22} {f(r.get('accuracy'), '8.3f')} {f(r.get('centered'), '8.3f')} "
                     f"{f(r.get('pass_at_1'), '7.3f')} {f(r.get('pass_at_k'), '7.3f')} {r['num_examples']:>5} "
                     f"{f(r.get('eval_seconds'), '8.2f')} {f(r.get('examples_per_s'), '7.2f')}")
    return "\n".join(lines)
