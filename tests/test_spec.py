"""Pipeline spec parsing and validation (jobs/spec.py), with the built-in noop kind: fast, no processes."""
from pathlib import Path

import pytest
import yaml

from jobs import spec
from nanochat.errors import ConfigError

GOOD = {
    "name": "t",
    "cluster": {"partition": "gpu", "time_min": 30, "setup": ["module load cuda"]},
    "defaults": {"args": {"seconds": 0.5, "steps": 2}, "resources": {"cpus_per_task": 2}},
    "stages": {
        "d": {"kind": "noop", "depends_on": ["b", "c"]},
        "b": {"kind": "noop", "depends_on": ["a"], "resources": {"time_min": 5, "max_requeues": 2}},
        "c": {"kind": "noop", "depends_on": "a", "variants": [{"name": "x", "args": {"seconds": 1}}, {"name": "y"}]},
        "a": {"kind": "noop", "args": {"steps": 0}},
    },
}


def write(tmp_path: Path, data, name="p.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_good_spec_resolves_order_defaults_and_resources(tmp_path):
    p = spec.load_pipeline(write(tmp_path, GOOD))
    assert list(p.stages) == ["a", "b", "c", "d"]                 # dependencies before dependants
    assert p.stages["a"].args == {"seconds": 0.5, "steps": 0}       # stage args override defaults.args
    assert p.stages["b"].args == {"seconds": 0.5, "steps": 2}
    assert p.stages["b"].resources.time_min == 5                    # stage resources > defaults > cluster
    assert p.stages["a"].resources.time_min == 30
    assert p.stages["a"].resources.cpus_per_task == 2
    assert p.stages["b"].resources.max_requeues == 2
    assert p.stages["c"].depends_on == ["a"] and p.stages["c"].num_tasks == 2
    assert p.cluster.setup == ["module load cuda"]


def test_set_overrides_reach_every_section(tmp_path):
    path = write(tmp_path, GOOD)
    p = spec.load_pipeline(path, ["b.seconds=2", "a.args.fail=true", "b.resources.time_min=7",
                                  "defaults.steps=9", "cluster.partition=debug", "results_dir=/tmp/x",
                                  "defaults.resources.mem_gb=4"])
    assert p.stages["b"].args["seconds"] == 2 and p.stages["a"].args["fail"] is True
    assert p.stages["b"].resources.time_min == 7
    assert p.stages["d"].args["steps"] == 9 and p.stages["a"].args["steps"] == 0
    assert p.cluster.partition == "debug" and p.results_dir == "/tmp/x"
    assert p.stages["d"].resources.mem_gb == 4
    assert p.raw["stages"]["b"]["args"]["seconds"] == 2             # the resolved spec carries the overrides


BAD = [
    # (mutation of GOOD as a function, expected key in the message, expected words)
    (lambda d: d["stages"]["a"]["args"].update(secnds=1), "stages.a.args.secnds", "did you mean seconds?"),
    (lambda d: d["stages"]["a"]["args"].update(steps="ten"), "stages.a.args.steps", "expected int"),
    (lambda d: d["stages"]["a"]["args"].update(fail=1), "stages.a.args.fail", "expected bool"),
    (lambda d: d["stages"]["a"].update(kind="noopp"), "stages.a.kind", "did you mean noop?"),
    (lambda d: d["stages"]["b"].update(depends_on=["zz"]), "stages.b.depends_on", "unknown stage 'zz'"),
    (lambda d: d["stages"]["a"].update(depends_on=["d"]), "depends_on", "dependency cycle"),
    (lambda d: d["stages"]["b"]["resources"].update(time_min=0), "stages.b.resources.time_min", "out of range"),
    (lambda d: d["stages"]["b"]["resources"].update(nodes=-1), "stages.b.resources.nodes", "out of range"),
    (lambda d: d["stages"]["b"]["resources"].update(gpus=2), "stages.b.resources.gpus", "did you mean gpus_per_node?"),
    (lambda d: d["stages"]["b"].update(resource={}), "stages.b.resource", "did you mean resources?"),
    (lambda d: d["cluster"].update(partiton="x"), "cluster.partiton", "did you mean partition?"),
    (lambda d: d.update(stagez={}), "stagez", "did you mean stages?"),
    (lambda d: d["defaults"]["args"].update(secondz=1), "defaults.args.secondz", "did you mean seconds?"),
    (lambda d: d["stages"]["a"]["args"].update(out_dir="/x"), "stages.a.args.out_dir", "set by the pipeline runner"),
    (lambda d: d["stages"]["c"]["variants"].append({"name": "x"}), "stages.c.variants", "unique"),
    (lambda d: d["stages"]["c"]["variants"][0]["args"].update(stepz=1), "stages.c.variants[0].args.stepz", "did you mean steps?"),
    (lambda d: d["stages"]["b"]["resources"].update(signal_delay_s=600), "stages.b.resources.signal_delay_s", "shorter than time_min"),
    (lambda d: d["stages"]["b"].update(args={"init_from": "c"}), "stages.b.args.init_from", "must be in depends_on"),
    (lambda d: d.update(stages={}), "stages", "at least one stage"),
    # variant names become path components (rows, stage folders): validated like stage names
    (lambda d: d["stages"]["c"]["variants"][0].update(name="a/b"), "stages.c.variants[0].name", "no '/'"),
    (lambda d: d["stages"]["c"]["variants"][0].update(name=".."), "stages.c.variants[0].name", "no '/'"),
    (lambda d: d["stages"]["c"]["variants"][0].update(name="a b"), "stages.c.variants[0].name", "variant names"),
    (lambda d: d["stages"]["c"]["variants"][0].update(name="x\n"), "stages.c.variants[0].name", "variant names"),
    (lambda d: d["stages"].update({"e\n": {"kind": "noop"}}), "stages.'e", "stage names are"),
    # values that reach the job script's #SBATCH lines and the run folder: a newline there was a shell line
    (lambda d: d.update(name="t\necho pwned"), "name", "pipeline names are"),
    (lambda d: d.update(name="../up"), "name", "pipeline names are"),
    (lambda d: d["cluster"].update(partition="gpu\n#SBATCH --uid=0"), "cluster.partition", "comma-separated"),
    (lambda d: d["cluster"].update(account="lab$(id)"), "cluster.account", "letters, digits"),
    (lambda d: d["cluster"].update(qos="high normal"), "cluster.qos", "letters, digits"),
    (lambda d: d["cluster"].update(constraint="a100\nrm -rf ~"), "cluster.constraint", "no spaces"),
    (lambda d: d["stages"]["b"]["resources"].update(partition="x'y"), "stages.b.resources.partition", "letters"),
    # more ranks per node than GPUs: two ranks would share one, NCCL fails hours later
    (lambda d: d["stages"]["b"]["resources"].update(tasks_per_node=4, gpus_per_node=2),
     "stages.b.resources.tasks_per_node", "would share a GPU"),
    (lambda d: d["cluster"].update(gpus_per_node=1) or d["stages"]["b"]["resources"].update(tasks_per_node=2),
     "stages.b.resources.tasks_per_node", "would share a GPU"),
    # int8 decode has no CUDA kernel: refused where the stage runs on GPUs (device_type auto) or says cuda
    (lambda d: d["stages"].update(i={"kind": "inference_bench", "resources": {"gpus_per_node": 1},
                                     "args": {"precision": "int8"}}), "stages.i.args.precision", "no CUDA kernel"),
    (lambda d: d["stages"].update(i={"kind": "inference_bench", "args": {"precision": "int8", "device_type": "cuda"}}),
     "stages.i.args.precision", "no CUDA kernel"),
]


@pytest.mark.parametrize("mutate,key,words", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_specs_name_the_file_and_the_key(tmp_path, mutate, key, words):
    import copy
    data = copy.deepcopy(GOOD)
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        spec.load_pipeline(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and key in msg and words in msg, msg
    assert "\n" not in msg


def test_slurm_values_that_sbatch_takes_pass(tmp_path):
    import copy
    data = copy.deepcopy(GOOD)
    data["cluster"].update(partition="gpu,gpu-long", account="lab.ml_2", qos="normal", constraint="[a100|h100]&ib*2")
    assert spec.load_pipeline(write(tmp_path, data)).cluster.constraint == "[a100|h100]&ib*2"
    data.pop("name")
    with pytest.raises(ConfigError, match=r"name: missing, and the file name 'my run' is not a pipeline name"):
        spec.load_pipeline(write(tmp_path, data, "my run.yaml"))


def test_missing_file_and_bad_yaml_and_bad_set(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        spec.load_pipeline(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        spec.load_pipeline(write(tmp_path, "stages:\n  a: [unclosed\n", "bad.yaml"))
    with pytest.raises(ConfigError, match=r"--set zz.x: no stage or section named 'zz'"):
        spec.load_pipeline(write(tmp_path, GOOD), ["zz.x=1"])
    with pytest.raises(ConfigError, match=r"--set a: expected KEY=VALUE"):
        spec.load_pipeline(write(tmp_path, GOOD), ["a"])
    with pytest.raises(ConfigError, match=r"stages.a.args.seconds: expected float"):
        spec.load_pipeline(write(tmp_path, GOOD), ["a.seconds=[1, 2]"])


def test_value_matches_follows_annotations():
    assert spec.value_matches(3, float) and not spec.value_matches(True, int)
    assert spec.value_matches(None, int | None) and not spec.value_matches("x", int | None)
    assert spec.value_matches([1, 2], list[int]) and not spec.value_matches([1, "a"], list[int])


def test_dependants_closure(tmp_path):
    p = spec.load_pipeline(write(tmp_path, GOOD))
    assert spec.dependants(p, {"b"}) == {"b", "d"}
    assert spec.dependants(p, {"a"}) == {"a", "b", "c", "d"}


@pytest.mark.parametrize("path", sorted((spec.PIPELINES_DIR).glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_validate(path):
    p = spec.load_pipeline(path)
    assert p.stages
    kinds = {s.kind for s in p.stages.values()}
    assert kinds <= set(spec.KINDS)


def test_smoke_pipeline_has_its_stages_in_order():
    p = spec.load_pipeline(spec.DEFAULT_PIPELINE)
    assert [s.kind for s in p.stages.values()] == ["probe", "base_train", "base_train", "mid_train", "sft", "sft",
                                                   "inference_bench", "base_eval", "chat_eval"]


def test_tasks_per_gpu_and_int8_on_cpu_stages_are_fine(tmp_path):
    import copy
    data = copy.deepcopy(GOOD)
    data["stages"]["b"]["resources"].update(tasks_per_node=2)                        # CPU ranks (gloo): no GPUs
    data["stages"]["i"] = {"kind": "inference_bench", "args": {"precision": "int8"}}  # a CPU stage
    data["stages"]["g"] = {"kind": "inference_bench", "resources": {"gpus_per_node": 2, "tasks_per_node": 2}}
    p = spec.load_pipeline(write(tmp_path, data))
    assert p.stages["b"].resources.tasks_per_node == 2 and p.stages["i"].args["precision"] == "int8"
