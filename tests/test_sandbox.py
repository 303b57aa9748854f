"""nanochat.sandbox: what runs, how it is scored, and what happens where no sandbox can be made.
Every program really runs in bubblewrap (no mocks); the hostile ones are in test_sandbox_attacks.py."""
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nanochat import sandbox
from nanochat.sandbox import isolation, run_python, run_tests
from nanochat.tasks.humaneval import build_checks, build_solution, load, score_completion
from nanochat.tasks.common import FIXTURES_DIR

import sandbox_attacks

REPO = Path(__file__).resolve().parents[1]

if isolation().kind == "none":
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs the sandbox: {isolation().reason}")
    pytest.skip(isolation().reason, allow_module_level=True)


def test_isolation_was_found_by_running_a_check_in_it():
    iso = isolation()
    assert iso.kind == "bwrap" and iso.label.startswith("bwrap") and os.path.isfile(iso.python)


def test_ordinary_program_passes_and_failures_fail():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]\n").passed
    r = run_python("assert 1 == 2\n")
    assert r.outcome == "failed" and "AssertionError" in r.stderr
    r = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.getcwd(), os.listdir('.'))\n")
    assert r.passed and r.stdout.split() == ["/tmp", "['scratch.txt']"]   # its own, empty, writable /tmp
    assert r.isolation == isolation().label


def test_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n")
    assert r.passed and "SECRET_TOKEN" not in r.stdout and r.stdout.split()[-1] == "1"


def test_values_cross_between_checks_and_solution_by_exact_type():
    solution = ("def f(x):\n    return [x, (x, -0.0), {x: b'\\x00'}, {1, 2}, frozenset({3}), None, True, 2 ** 80,"
                " float('inf'), 1 + 2j, 'caf\\u00e9']\n")
    checks = ("import math\ndef check(c):\n    k = ('a', 1)\n    r = c(k)\n"
              "    assert r == [k, (k, -0.0), {k: b'\\x00'}, {1, 2}, frozenset({3}), None, True, 2 ** 80, math.inf,"
              " 1 + 2j, 'caf\\u00e9']\n"
              "    assert type(r[1]) is tuple and math.copysign(1, r[1][1]) == -1 and r[6] is True\n")
    assert run_tests(solution, checks, "f").passed
    # a value that is not plain data fails the check, it is not passed through
    r = run_tests("def f():\n    return object()\n", "def check(c):\n    c()\n", "f")
    assert not r.passed and "cannot pass" in r.detail


def test_humaneval_fixture_solutions_pass_and_wrong_ones_fail():
    problems = load(FIXTURES_DIR / "humaneval.jsonl")
    for p in problems:
        assert score_completion(p, p["canonical_solution"], timeout_s=10), p["task_id"]
    assert not any(score_completion(p, "    return None\n", timeout_s=10) for p in problems[:4])
    p = problems[0]
    assert score_completion(p, f"```python\n{p['prompt']}{p['canonical_solution']}```", timeout_s=10)
    # the checks see the prompt's helpers, not the solution's version of them
    assert build_checks(p).startswith(p["prompt"]) and build_solution(p, "    return 1\n").startswith(p["prompt"])


def _code_copy() -> Path:
    """nanochat/ in a folder every user can read (the tree may sit under /root)."""
    base = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-test-", dir="/tmp"))
    shutil.copytree(REPO / "nanochat", base / "nanochat", ignore=shutil.ignore_patterns("__pycache__"))
    for p in [base, *base.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return base


PROBE = """
import json
from nanochat import sandbox
iso = sandbox.isolation()
out = {"kind": iso.kind, "reason": iso.reason}
try:
    sandbox.run_tests("def f():\\n    return 1\\n", "def check(c):\\n    assert c() == 1\\n", "f")
except sandbox.SandboxUnavailable as e:
    out["refused"] = str(e)
r = sandbox.run_tests("def f():\\n    return 1\\n", "def check(c):\\n    assert c() == 1\\n", "f", allow_unsafe=True)
out.update(unsafe_passed=r.passed, unsafe_label=r.isolation)
print(json.dumps(out))
"""


def _probe(prefix: list[str], python: str, env_path: str) -> dict:
    code = _code_copy()
    try:
        out = subprocess.run(prefix + [python, "-c", PROBE], capture_output=True, text=True, timeout=120,
                             env={"PATH": env_path, "PYTHONPATH": str(code)}, cwd=str(code))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(code, ignore_errors=True)


def test_without_bwrap_code_is_refused_with_the_reason_unless_allowed():
    got = _probe([], sys.executable, "/nonexistent")
    assert got["kind"] == "none" and "bubblewrap (bwrap) is not installed" in got["refused"]
    assert "apt-get install bubblewrap" in got["refused"] and "\n" not in got["refused"]
    assert got["unsafe_passed"] and got["unsafe_label"] == sandbox.UNSAFE


def test_where_namespaces_cannot_be_made_the_probe_says_so():
    """bwrap installed, but the kernel refuses new user namespaces (a container's default, or the
    sysctls off): a real refusal, made here by a parent namespace allowing only one more namespace,
    used up by the one the evaluator runs in."""
    python = sandbox_attacks.python_for("nobody") if os.geteuid() == 0 else sys.executable
    if python is None:
        pytest.skip("no interpreter user nobody can run")
    prefix = sandbox_attacks._as("nobody") if os.geteuid() == 0 else []
    inner = ("echo 1 > /proc/sys/user/max_user_namespaces && "
             "exec unshare --user --map-user=65534 --map-group=65534 -- \"$@\"")
    got = _probe(prefix + ["unshare", "--user", "--map-root-user", "sh", "-c", inner, "sh"], python, "/usr/bin:/bin")
    assert got["kind"] == "none" and "could not start one here" in got["refused"]
    assert "max_user_namespaces" in got["refused"] and got["unsafe_passed"]


def test_a_killed_evaluator_leaves_no_sandboxed_process():
    """The evaluator dies (SIGKILL) while its program, which left its process group, still runs:
    the sandbox goes with it (bwrap --die-with-parent kills its PID 1, and the namespace with it)."""
    marker = "nanochatdie" + os.urandom(4).hex()
    program = (f"import os, sys, time\nos.setsid() if os.getpid() != 1 else None\nif os.fork() == 0:\n"
               f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
               "print('started', flush=True)\ntime.sleep(60)\n")
    code = f"from nanochat.sandbox import run_python\nrun_python({program!r}, timeout_s=60)\n"
    evaluator = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO))
    try:
        pids = []
        while not pids:     # until the sleeper inside is running
            assert evaluator.poll() is None
            time.sleep(0.02)
            pids = sandbox_attacks.marked_processes(marker)
        alive = {os.pidfd_open(p) for p in pids}
        evaluator.send_signal(signal.SIGKILL)
        evaluator.wait()
        while alive:       # a pidfd becomes readable when its process ends
            ready, _, _ = select.select(list(alive), [], [], 60)
            assert ready, "a sandboxed process outlived the evaluator"
            alive -= set(ready)
    finally:
        evaluator.kill()
        for p in sandbox_attacks.marked_processes(marker):
            os.kill(p, signal.SIGKILL)


def test_an_older_bwrap_without_size_or_disable_userns_still_isolates():
    """bwrap 0.4 (RHEL 9) knows neither --size nor --disable-userns: the sandbox then has no
    writable folder at all rather than an uncapped one. The real bwrap, behind a wrapper whose
    --help does not list them."""
    code = _code_copy()
    wrapper = code / "bin" / "bwrap"
    wrapper.parent.mkdir(mode=0o755)
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = --help ]; then {shutil.which("bwrap")} --help | '
                       f'grep -v -e --size -e --disable-userns; else exec {shutil.which("bwrap")} "$@"; fi\n')
    wrapper.chmod(0o755)
    program = """
import json
from nanochat import sandbox
iso = sandbox.isolation()
w = sandbox.run_python("open('scratch', 'w').write('x')")
ok = sandbox.run_tests("def f():\\n    return 1\\n", "def check(c):\\n    assert c() == 1\\n", "f")
print(json.dumps({"label": iso.label, "options": iso.options, "write": w.passed, "score": ok.passed}))
"""
    try:
        out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                             env={"PATH": f"{wrapper.parent}:/usr/bin:/bin", "PYTHONPATH": str(code)})
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(code, ignore_errors=True)
    assert got["options"] == [] and "no writable folder" in got["label"] and "nested user namespaces" in got["label"]
    assert not got["write"] and got["score"]
