"""
`python -m jobs submit PIPELINE --dry-run`: what a submission would do, without doing it.

Validates and resolves the spec exactly as submit does (same loader, same data check), then prints
per stage: the sbatch script submitit would write (rendered by submitit itself, so it is the script,
not a description of it), the resources, what it waits for, where its outputs and logs go; then the
data plan. Where Slurm answers, each stage's request is put to `sbatch --test-only`, which says when
and where the job would start or why the partition cannot take it. Nothing is submitted and no run
folder is written; the sbatch scripts for --test-only live in a temporary folder, removed after.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from jobs import slurm
from nanochat.files import get_base_dir


def render_sbatch(pipeline, stage, folder: Path, dependency_ids: list[str]) -> str:
    """The sbatch script submitit would submit for this stage (job arrays: one per variant)."""
    import submitit
    from jobs.submit import slurm_parameters
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=stage.resources.max_requeues)
    ex.update_parameters(**slurm_parameters(pipeline, stage, dependency_ids))
    if stage.variants:
        ex.update_parameters(array_parallelism=len(stage.variants))
        ex.parameters["map_count"] = len(stage.variants)      # what map_array sets for an array
    return ex._make_submission_file_text(ex._submitit_command_str, uid="dry-run")


def sbatch_test_only(script: str, workdir: Path) -> dict:
    """Ask the controller whether the request fits (`sbatch --test-only`): {ok, answer}. The
    dependency line is dropped: the jobs it names do not exist yet, and it does not change the fit."""
    lines = [ln for ln in script.splitlines() if not ln.startswith(("#SBATCH --dependency", "#SBATCH --kill-on-invalid-dep"))]
    path = workdir / "stage.sbatch"
    path.write_text("\n".join(lines) + "\n")
    return slurm.sbatch_test_only(path)


def dry_run(pipeline, run_id: str, executor: str, max_parallel: int, log=print) -> dict:
    """Print what `submit` would do and return it as plain data (for --json)."""
    from jobs import data_plan, runs
    plan = data_plan.check_pipeline_data(pipeline, log=log)        # the same check (and num_shards) as submit
    workdir = get_base_dir().resolve()
    run_dir = (runs.results_root(pipeline) / run_id).resolve()
    ask_slurm = slurm.slurm_available() and shutil.which("sbatch") is not None
    out = {"dry_run": True, "pipeline": pipeline.name, "spec": pipeline.source, "run_id": run_id,
           "executor": executor, "run_dir": str(run_dir), "workdir": str(workdir / run_id), "stages": {}}
    log(f"dry run of {pipeline.name} ({pipeline.source}): nothing is submitted, no run folder is written")
    log(f"  executor: {executor}" + (f" (at most {max_parallel} stage processes at once)" if executor == "local" else ""))
    log(f"  run id:   {run_id} (a new one is chosen at submit unless --run-id is given)")
    log(f"  results:  {run_dir}/ (result rows, report.csv, summary.md, plots)")
    log(f"  work dir: {workdir / run_id}/<stage>/ (checkpoints, tokenizer, submitit folders)")
    log("")
    log("dependency graph (afterok: a stage starts when all it waits for completed; a failure cancels its dependants):")
    for name, stage in pipeline.stages.items():
        waits = ", ".join(stage.depends_on) if stage.depends_on else "-"
        tasks = f"  [array of {len(stage.variants)}: {', '.join(v.name for v in stage.variants)}]" if stage.variants else ""
        log(f"  {name:<18} <- {waits}{tasks}")
    with tempfile.TemporaryDirectory(prefix="nanochat-dry-run-") as tmp:
        for name, stage in pipeline.stages.items():
            r = stage.resources
            folder = workdir / run_id / "submitit" / name
            deps = [f"<{d}>" for d in stage.depends_on]      # job ids are known only after sbatch
            script = render_sbatch(pipeline, stage, folder, deps)
            if executor == "local":
                logs = str(run_dir / "logs" / (f"{name}.<task>.log" if stage.variants else f"{name}.log"))
            else:
                logs = str(folder / ("%A_%a_0_log.out|err" if stage.variants else "%j_0_log.out|err"))
            info = {"kind": stage.kind, "depends_on": stage.depends_on,
                    "variants": [v.name for v in stage.variants],
                    "resources": {"nodes": r.nodes, "tasks_per_node": r.tasks_per_node, "gpus_per_node": r.gpus_per_node,
                                  "cpus_per_task": r.cpus_per_task, "mem_gb": r.mem_gb, "time_min": r.time_min,
                                  "max_requeues": r.max_requeues, "signal_delay_s": r.signal_delay_s,
                                  "partition": r.partition or pipeline.cluster.partition,
                                  "constraint": r.constraint or pipeline.cluster.constraint},
                    "outputs": str(workdir / run_id / name), "logs": logs, "sbatch_script": script}
            log("")
            log(f"== stage {name} ({stage.kind}) " + "=" * max(0, 60 - len(name) - len(stage.kind)))
            res = info["resources"]
            log(f"  resources: {r.nodes} node(s) x {r.tasks_per_node} task(s), {r.gpus_per_node} GPU(s)/node, "
                f"{r.cpus_per_task} CPU(s)/task, mem {str(r.mem_gb) + ' GB' if r.mem_gb else 'partition default'}, "
                f"{r.time_min} min, partition {res['partition'] or '(default)'}"
                + (f", constraint {res['constraint']}" if res["constraint"] else "")
                + f"; requeued at most {r.max_requeues}x, USR2 {r.signal_delay_s} s before the limit")
            log(f"  waits for: {', '.join(stage.depends_on) or 'nothing'}")
            log(f"  outputs:   {info['outputs']}/ and {run_dir}/rows/{name}__*.json")
            log(f"  logs:      {logs}")
            if stage.args:
                log("  args:      " + ", ".join(f"{k}={v}" for k, v in sorted(stage.args.items())))
            log("  sbatch script (submitit):")
            for line in script.splitlines():
                log(f"    | {line}")
            if ask_slurm:
                info["test_only"] = sbatch_test_only(script, Path(tmp))
                log(f"  sbatch --test-only: {'fits' if info['test_only']['ok'] else 'REFUSED'}: {info['test_only']['answer']}")
            out["stages"][name] = info
    out["data_plan"] = plan
    log("")
    log(data_plan.format_plan(plan))
    log("")
    answers = [s["test_only"]["ok"] for s in out["stages"].values() if "test_only" in s]
    log(f"{len(out['stages'])} stage(s) would be submitted; sbatch --test-only: "
        + (f"{sum(answers)} fit, {len(answers) - sum(answers)} refused" if ask_slurm else "not asked (no Slurm answers here)"))
    return out
