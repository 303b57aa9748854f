"""The smoke pipeline measures all four optimizations against their baselines in one run: the
committed CPU reference (a real run of pipelines/smoke.yaml) gives four measured ratios and no
"not measured" line, and the pipeline still holds the baseline variants that make it so."""
import shutil
from pathlib import Path

from jobs import report as rp
from jobs.report import pairs as report_pairs
from jobs import spec

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "results" / "reference" / "cpu-epyc-2core" / "smoke"
FOUR = {"auto batch size", "KV cache", "compile for SFT", "independent first token"}


def test_the_smoke_pipeline_runs_a_baseline_for_each_optimization():
    p = spec.load_pipeline(spec.DEFAULT_PIPELINE)
    fixed = [s for s in p.stages.values() if s.kind == "base_train" and int(s.args.get("device_batch_size") or 0) > 0]
    auto = [s for s in p.stages.values() if s.kind == "base_train" and not int(s.args.get("device_batch_size") or 0)]
    assert fixed and auto
    sft_modes = {v.args.get("mode") or s.args.get("mode") for s in p.stages.values() if s.kind == "sft"
                 for v in (s.variants or [None]) if v is not None} | {s.args.get("mode") for s in p.stages.values()
                                                                      if s.kind == "sft" and not s.variants}
    assert {"eager-dynamic", "eager-pack", "compile-pad", "compile-pack"} <= sft_modes
    assert any(s.kind == "inference_bench" for s in p.stages.values())


def test_the_cpu_reference_has_four_measured_ratios_and_no_not_measured_line(tmp_path):
    folder = shutil.copytree(REFERENCE, tmp_path / REFERENCE.name)
    rep = rp.build_report([folder], tmp_path, use_sacct=False)
    (run,) = rep.runs
    opts = report_pairs.optimizations(run.rows)
    assert FOUR <= {o.name for o in opts if o.ratio is not None}   # and SFT's packing / compile split
    # every pair either has its ratio, or is one this device cannot measure (said why, apart)
    assert all(o.ratio is not None or o.not_applicable for o in opts)
    summary = (folder / "summary.md").read_text()
    assert report_pairs.NOT_MEASURED not in summary
    assert "These ratios were measured on a CPU" in summary and "Not measurable on this device" in summary
