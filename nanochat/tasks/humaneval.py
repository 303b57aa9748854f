"""HumanEval (openai/openai_humaneval: task_id, prompt, canonical_solution, test, entry_point).
The model is shown the prompt (a signature and docstring) and writes the function. Its code runs in
nanochat.sandbox, never in this process, apart from the checks: the problem's prompt (for helpers
such as `poly` that some tests call) and its `check(candidate)` run in the sandbox's harness and
call the solution through a pipe, so a completion cannot rewrite the checks or fake the verdict."""
from __future__ import annotations

import re
from pathlib import Path

from nanochat.sandbox import run_tests
from nanochat.tasks.common import load_records, require

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def load(path: Path) -> list[dict]:
    out = []
    for i, r in enumerate(load_records(path)):
        require(r, ("task_id", "prompt", "test", "entry_point"), path, i)
        out.append(r)
    return out


def render_prompt(problem: dict) -> str:
    return f"Complete this Python function.\n\n```python\n{problem['prompt']}```"


def extract_code(completion: str) -> str:
    """The first fenced code block if there is one (chat models wrap code), else the text."""
    m = CODE_BLOCK_RE.search(completion)
    return m.group(1) if m else completion


def build_solution(problem: dict, completion: str) -> str:
    code = extract_code(completion)
    if not re.search(rf"def\s+{re.escape(problem['entry_point'])}\s*\(", code):
        code = problem["prompt"] + code       # a body only: put it under the given signature
    return code


def build_checks(problem: dict) -> str:
    return f"{problem['prompt']}\n\n{problem['test']}\n"


def score_completion(problem: dict, completion: str, timeout_s: float = 10.0, allow_unsafe: bool = False) -> bool:
    """Whether the completion passes the problem's checks (nanochat.sandbox.SandboxUnavailable
    where there is no sandbox and not allow_unsafe)."""
    return run_tests(build_solution(problem, completion), build_checks(problem), problem["entry_point"],
                     timeout_s=timeout_s, allow_unsafe=allow_unsafe).passed
