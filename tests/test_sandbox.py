"""Hostile programs in the HumanEval sandbox: each is contained, scored as a failure, and the
evaluator keeps going. Every program really runs (no mocks); the table is printed with -s."""
import os
import socket
import threading

import pytest

from nanochat.sandbox import isolation, run_python
from nanochat.tasks.humaneval import score_completion

MODES = ["guard"] + (["namespace", "namespace-no-hook"] if isolation() == "namespace" else [])


def _listener():
    """A real TCP server on 127.0.0.1 that records whether anyone connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, hits, stop


def _hostile(victim, port):
    return {
        "while True": "while True:\n    pass\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "10 GB allocation": "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n",
        "delete outside temp": f"import os\nos.remove({str(victim)!r})\n",
        "rmtree outside temp": f"import shutil\nshutil.rmtree({str(victim.parent)!r})\n",
        "socket connection": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'x')\n",
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_hostile_programs_are_contained(tmp_path, mode, capsys):
    victim = tmp_path / "keep" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("keep me")
    srv, hits, stop = _listener()
    table = []
    try:
        for name, program in _hostile(victim, srv.getsockname()[1]).items():
            result = run_python(program, timeout_s=2.0, mode=mode.replace("-no-hook", ""),
                                audit_hook=not mode.endswith("no-hook"))
            table.append((name, result.outcome, result.returncode, round(result.seconds, 2)))
            assert not result.passed, (name, result)
            assert result.seconds < 10, (name, result)
            # the evaluator keeps going: the next program runs normally
            assert run_python("print(6 * 7)", timeout_s=5, mode=mode.replace("-no-hook", "")).stdout.strip() == "42"
    finally:
        stop.set()
        srv.close()
    assert victim.read_text() == "keep me"
    assert hits == [], "a sandboxed program reached the listening socket"
    with capsys.disabled():
        print(f"\nsandbox mode {mode}:")
        for row in table:
            print("  %-22s %-8s rc=%-4s %5.2fs" % row)
    outcomes = dict((r[0], r[1]) for r in table)
    assert outcomes["while True"] == "timeout"
    assert outcomes["10 GB allocation"] == "memory"
    if mode != "namespace-no-hook":
        assert outcomes["socket connection"] == "blocked"
        assert outcomes["delete outside temp"] == "blocked"


def test_ordinary_program_passes_and_failures_fail():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]\n").passed
    r = run_python("assert 1 == 2\n")
    assert r.outcome == "failed" and "AssertionError" in r.stderr
    r = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(os.listdir('.'))\n")
    assert r.passed and "scratch.txt" in r.stdout     # the temporary folder is writable


def test_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated)\n")
    assert r.passed and "SECRET_TOKEN" not in r.stdout and r.stdout.split()[-1] == "1"


def test_humaneval_scoring_survives_hostile_completions():
    problem = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    assert score_completion(problem, "    return a + b\n", timeout_s=5)
    assert not score_completion(problem, "    while True:\n        pass\n", timeout_s=1)
    assert not score_completion(problem, "    import os\n    os.system('echo hi')\n    return a + b\n", timeout_s=5)
    assert score_completion(problem, "```python\ndef add(a, b):\n    return b + a\n```", timeout_s=5)
    assert os.getpid() > 0   # still here
