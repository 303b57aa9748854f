"""
The chat_eval stage (after SFT): ARC, MMLU, GSM8K, HumanEval and ChatCORE, scored by nanochat.evaluate.
"""
from __future__ import annotations

from dataclasses import dataclass

from nanochat.evaluate import CHAT_TASKS, run_chat_eval, run_eval


@dataclass
class ChatEvalConfig:
    tasks: str = "arc_easy,arc_challenge,mmlu,gsm8k,humaneval"   # comma-separated
    data_dir: str = ""            # "" = <base_dir>/eval_data; "fixtures" = the small sets in the repository
    max_per_task: int = 0         # examples per task (0 = all)
    batch_size: int = 8           # prompts per forward for the multiple-choice sets
    num_samples: int = 1          # samples per problem for the generative tasks (pass@k with k = num_samples)
    max_new_tokens: int = 256
    temperature: float = 0.0      # 0 = greedy; pass@k with k > 1 needs > 0
    top_k: int = 50
    first_token: str = "independent"   # independent | broadcast (the old nanochat bug, for comparison)
    compare_broadcast: bool = False    # also run the generative tasks with first_token=broadcast
    sandbox_timeout_s: float = 10.0
    allow_unsafe_code: bool = False    # run HumanEval's model code even where no sandbox can be made
    seed: int = 42
    base_dir: str = ""
    out_dir: str = ""
    init_from: str = ""
    device_type: str = ""

    @staticmethod
    def check_args(args: dict) -> list[tuple[str, str]]:
        """(key, problem) for values the run would refuse; the pipeline spec calls it before submitting."""
        problems = []
        tasks = [t.strip() for t in str(args.get("tasks", ChatEvalConfig.tasks)).split(",") if t.strip()]
        unknown = [t for t in tasks if t not in CHAT_TASKS]
        if unknown or not tasks:
            problems.append(("tasks", f"unknown task {unknown[0] if unknown else '(none)'!r}; known: {', '.join(CHAT_TASKS)}"))
        if args.get("first_token", "independent") not in ("independent", "broadcast"):
            problems.append(("first_token", f"must be independent or broadcast, got {args['first_token']!r}"))
        for key in ("num_samples", "batch_size", "max_new_tokens"):
            if key in args and int(args[key]) < 1:
                problems.append((key, f"must be at least 1, got {args[key]}"))
        if int(args.get("num_samples", 1)) > 1 and float(args.get("temperature", 0.0)) == 0.0:
            problems.append(("temperature", "num_samples > 1 needs temperature > 0 (greedy samples are all alike)"))
        return problems


def run(cfg: ChatEvalConfig, should_stop=None) -> list[dict]:
    """One result dict per task (a skipped HumanEval included), then ChatCORE (in `centered`)."""
    return run_eval(cfg, run_chat_eval)
