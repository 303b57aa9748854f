"""HumanEval (openai/openai_humaneval: task_id, prompt, canonical_solution, test, entry_point).
The model is shown the prompt (a signature and docstring) and writes the function; the program
(its code, the tests, `check(entry_point)`) runs in nanochat.sandbox, never in this process, and
passes when it exits 0 within the limits."""
from __future__ import annotations

import re
from pathlib import Path

from nanochat.sandbox import run_python
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


def build_program(problem: dict, completion: str) -> str:
    code = extract_code(completion)
    if not re.search(rf"def\s+{re.escape(problem['entry_point'])}\s*\(", code):
        code = problem["prompt"] + code       # a body only: put it under the given signature
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_completion(problem: dict, completion: str, timeout_s: float = 10.0) -> bool:
    return run_python(build_program(problem, completion), timeout_s=timeout_s).passed
