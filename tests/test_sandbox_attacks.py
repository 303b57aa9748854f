"""The hostile programs of issue 24 and more (tests/sandbox_attacks.py), each run by a real evaluator
process as root and as user nobody, against a world set up to be attacked: files and sockets the
sandbox's user could reach, a token in the evaluator's environment, a bystander process of that
user, real local services (MariaDB, munge, slurmctld where the local Slurm is up). For each attack:
nothing got out (no file, socket, signal, token or process), a wrong solution did not pass, the
evaluator is alive. `python tests/sandbox_attacks.py session root|nobody [OLD_CHECKOUT]` prints the
same table for any checkout (81f54d8: most attacks get out)."""
import os
from pathlib import Path

import pytest

import sandbox_attacks
from nanochat.sandbox import isolation

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setting up the attacked world (other users' files, "
                                                           "a nobody bystander) needs root")


@pytest.mark.parametrize("user", ["root", "nobody"])
def test_every_attack_is_contained(user, capsys):
    if isolation().kind == "none" and os.environ.get("CI") != "true":
        pytest.skip(isolation().reason)
    python = sandbox_attacks.python_for(user)
    if python is None:
        pytest.skip(f"no interpreter user {user} can run (/usr/bin/python3)")
    rows = sandbox_attacks.session(user, REPO, python)
    with capsys.disabled():
        print(f"\nevaluator as {user}:")
        for r in rows:
            print(f"  {r['attack']:<22} {r['outcome']:<8} {'; '.join(r['escaped']) or 'contained'}")
    assert [r["attack"] for r in rows] == [a.name for a in sandbox_attacks.ATTACKS]
    escaped = {r["attack"]: r["escaped"] for r in rows if r["escaped"]}
    assert not escaped, escaped
    outcomes = {r["attack"]: r["outcome"] for r in rows}
    # the limits that held before still hold, and say so
    assert outcomes["while-true"] == "timeout" and outcomes["memory-10gb"] == "memory"
    assert all(outcomes[a.name] != "passed" for a in sandbox_attacks.ATTACKS if a.via == "score")
