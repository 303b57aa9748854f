"""The rehearsal: the cluster pipeline as shipped, scaled down, on the local two-node Slurm with a
local hub. First what it changes (no Slurm): only sizes and resources, one line per key, every stage,
dependency, rank and node kept; then the whole of artemis-a100 on the local Slurm (CI runs it)."""
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import jobs_cli, last_json, sacct
from jobs import spec
from jobs.commands import rehearse
from nanochat.errors import ConfigError

VENV_BIN = str(Path(sys.executable).parent)


def _artemis(sets=()):
    return spec.load_pipeline(spec.resolve_pipeline_path("artemis-a100"), list(sets))


def test_overrides_scale_sizes_and_resources_and_keep_the_pipeline():
    shipped = _artemis()
    overrides = rehearse.plan_overrides(shipped)
    keys = [o.key for o in overrides]
    assert len(keys) == len(set(keys))          # one line per key
    assert {"resources.gpus_per_node", "resources.cpus_per_task", "resources.mem_gb", "cluster.partition",
            "defaults.args.depth", "defaults.args.vocab_size", "args.seq_len", "args.num_steps"} <= set(keys)
    assert not any(k.endswith(("nodes", "tasks_per_node", "depends_on", "kind")) for k in keys)
    rehearsed = _artemis([item for o in overrides for item in o.sets])
    assert list(rehearsed.stages) == list(shipped.stages)
    for name, s in shipped.stages.items():
        r = rehearsed.stages[name]
        assert (r.kind, r.depends_on, r.variants) == (s.kind, s.depends_on, s.variants)
        assert (r.resources.nodes, r.resources.tasks_per_node) == (s.resources.nodes, s.resources.tasks_per_node)
        assert r.resources.gpus_per_node == 0 and r.resources.cpus_per_task == 1
    # the probe's shape comes from the stage it serves, so it is never set on the probe itself
    assert not any(item.startswith("probe.") and ".resources." not in item for o in overrides for item in o.sets)
    assert rehearsed.stages["base_train"].args["num_steps"] == 10 and rehearsed.stages["base_train"].args["depth"] == 2
    line = next(o for o in overrides if o.key == "resources.gpus_per_node").line()
    assert "1 / 2 -> 0" in line and "base_train" in line and "\n" not in line


def test_more_nodes_than_the_local_slurm_has_is_refused():
    p = _artemis(["base_train.resources.nodes=3"])
    with pytest.raises(ConfigError, match=r"stages.base_train.resources.nodes: 3 nodes, the local Slurm has 2"):
        rehearse.check_fits(p, 2)
    rehearse.check_fits(_artemis(["base_train.resources.nodes=2"]), 2)


def test_the_hub_serves_what_the_data_stage_names():
    pre, splits, bundle = rehearse.hub_sets(_artemis(["data.num_shards=3"]))
    assert pre == {"climbmix-400b": 3} and bundle
    assert splits == sorted(["smoltalk/train", "mmlu/auxiliary_train", "gsm8k/train", "arc_easy/test",
                             "arc_challenge/test", "mmlu/test", "gsm8k/test", "humaneval/test"])


@pytest.mark.slurm
@pytest.mark.slow
def test_rehearse_artemis_on_the_local_slurm(local_slurm, tmp_path):
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
               NANOCHAT_BASE_DIR=str(tmp_path / "work"), NANOCHAT_RESULTS_DIR=str(tmp_path / "results"))
    env.pop("HF_ENDPOINT", None)
    out = jobs_cli(env, "rehearse", "artemis-a100", "--run-id", "rehearsal", "--json", timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = last_json(out)
    shipped = _artemis()
    # every stage of the YAML, COMPLETED in Slurm's accounting, on the local nodes
    assert [s["stage"] for s in res["stages"]] == list(shipped.stages)
    acct = sacct([s["job_id"] for s in res["stages"]], fields=("State", "NodeList", "NNodes"))
    assert {s["stage"]: acct[s["job_id"]]["state"] for s in res["stages"]} == {n: "COMPLETED" for n in shipped.stages}
    assert all(acct[s["job_id"]]["nodelist"] in ("n1", "n2", "n[1-2]") for s in res["stages"])
    # the data stage fetched every set from the hub on 127.0.0.1, into a fresh work directory
    assert [s["set"] for s in res["fetch"]] == ["climbmix-400b", "smoltalk", "mmlu", "gsm8k", "core", "arc_easy",
                                                "arc_challenge", "mmlu", "gsm8k", "humaneval"]
    assert all(s["fetched"] == s["files"] > 0 for s in res["fetch"])
    assert res["workdir"].startswith(str(tmp_path / "work" / "rehearsal"))
    # the report card has a row per evaluation task
    card = res["report_card"]
    assert res["report_card_missing"] == []
    for task in ("name_a_thing", "why_it_broke", "counting", "CORE", "arc_easy", "arc_challenge", "mmlu", "gsm8k",
                 "gsm8k.broadcast", "humaneval", "humaneval.broadcast", "ChatCORE"):
        assert f"| {task} |" in card
    # what it overrode: one printed line per key
    for o in res["overrides"]:
        assert sum(1 for ln in out.stdout.splitlines() if ln.startswith(f"  {o['key']} ")) == 1, o["key"]
    saved = json.loads((tmp_path / "results" / "rehearsal" / "rehearsal.json").read_text())
    assert saved["state"] == "COMPLETED" and saved["wall_seconds"] == res["wall_seconds"]
    print(f"\nrehearsal of artemis-a100: {res['wall_seconds']} s")
