"""
Figures out of the rows: each optimization's baseline and optimized figure from the same run, as a
ratio; the evaluation stages' report card; means per (stage, variant) and their ratios between runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from jobs.report.load import RunData
from jobs.report.rows import row_extra

# The figures compared between runs, per (stage, variant).
FIGURE_METRICS = ["tokens_per_s", "real_tokens_per_s", "mfu", "device_batch_size", "final_loss", "val_bpb",
                  "wall_time_s", "gpu_hours"]

NOT_MEASURED = "not measured in this run"


# -----------------------------------------------------------------------------
# The four optimizations: baseline and optimized figure from the same run, as a ratio

@dataclass
class Optimization:
    name: str               # which optimization
    metric: str             # which figure
    baseline_label: str
    optimized_label: str
    baseline: float | None = None
    optimized: float | None = None
    n_baseline: int = 0     # rows averaged on each side
    n_optimized: int = 0
    note: str = ""          # "not measured in this run" and why, when a side is missing
    not_applicable: str = ""  # why this device cannot measure it (a CUDA-only variant on a CPU, MFU without a peak)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.optimized is None or self.baseline == 0:
            return None
        return self.optimized / self.baseline

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


# (optimization, row kind, metric, baseline side, optimized side); a side is (label, variant names,
# batch-size sources): a row belongs to it by its variant, or by where its batch size came from.
# The auto batch size pair goes by source because pipelines name the fixed-batch variant freely
# ("baseline", "fixed-32"): config = fixed, probe/cache/fallback = found automatically. A fixed
# batch that an out-of-memory fallback shrank ("config+oom_fallback") stays on the fixed side: the
# comparison is between what was asked for, not what the fallback made of it.
# Rows of kind "bench" (the bench commands) count as well: the variant names tell the pairs apart.
FIXED_BATCH = ("baseline", ("baseline",), ("config", "config+oom_fallback"))
AUTO_BATCH = ("auto", ("auto",), ("probe", "cache", "fallback"))
BATCH_SOURCES = FIXED_BATCH[2] + AUTO_BATCH[2]
OPTIMIZATION_PAIRS = [
    ("auto batch size", "base_train", "tokens_per_s", FIXED_BATCH, AUTO_BATCH),
    ("auto batch size", "base_train", "mfu", FIXED_BATCH, AUTO_BATCH),
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-eager", ("kv-eager",), ())),
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-static", ("kv-static",), ())),
    # kv-graph: the CUDA-graph-captured decode step, CUDA only (SKIPPED on CPU)
    ("KV cache", "inference_bench", "tokens_per_s", ("naive", ("naive",), ()), ("kv-graph", ("kv-graph",), ())),
    ("compile for SFT", "sft", "real_tokens_per_s", ("eager-dynamic", ("eager-dynamic",), ()),
     ("compile-pad", ("compile-pad",), ())),
    ("compile for SFT", "sft", "real_tokens_per_s", ("eager-dynamic", ("eager-dynamic",), ()),
     ("compile-pack", ("compile-pack",), ())),
    # what each part gives (issue 14): packing with compile held fixed, compile with packing held fixed;
    # eager-dynamic -> compile-pack above is everything against the original
    ("packing for SFT", "sft", "real_tokens_per_s", ("compile-pad", ("compile-pad",), ()),
     ("compile-pack", ("compile-pack",), ())),
    ("compile for packed SFT", "sft", "real_tokens_per_s", ("eager-pack", ("eager-pack",), ()),
     ("compile-pack", ("compile-pack",), ())),
]


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["state"].fillna("") == "COMPLETED"]


def _side(df: pd.DataFrame, kind: str, side: tuple, metric: str) -> tuple[float | None, int, str]:
    """Mean of `metric` over the COMPLETED rows of this kind on this side; (value, n, why-not)."""
    variant, variants, sources = side
    by_variant = df["kind"].isin([kind, "bench"]).fillna(False) & df["variant"].isin(variants).fillna(False)
    # by source only within the stage kind itself: other benchmarks also run at a configured batch
    of_kind = (df["kind"] == kind).fillna(False)
    by_source = of_kind & df["batch_size_source"].isin(sources).fillna(False)
    if sources:  # a row whose source says fixed or found sits on that side only, whatever its variant is called
        by_variant &= ~(of_kind & df["batch_size_source"].isin(BATCH_SOURCES).fillna(False))
    rows = df[by_variant | by_source]
    if rows.empty:
        return None, 0, f"no {variant} row"
    done = _completed(rows)[metric].dropna()
    if done.empty:
        states = ", ".join(sorted(set(rows["state"].fillna("no state"))))
        reasons = {row_extra({"extra": e}).get("skip_reason") for e in rows["extra"].astype(object)} - {None}
        return None, 0, f"no {metric} in {variant} rows ({states})" + \
            (f": {'; '.join(sorted(map(str, reasons)))}" if reasons else "")
    return float(done.mean()), int(len(done)), ""


def _first_token_rows(df: pd.DataFrame) -> list[tuple[str, str, dict]]:
    """(variant, job_id, extra) of the inference rows. Not only COMPLETED ones: the diversity figure
    is measured once per job and copied onto every variant row, a skipped variant's included."""
    rows = df[df["kind"].isin(["inference_bench", "bench"])]
    return [(v if isinstance(v, str) else "", j if isinstance(j, str) else "", row_extra({"extra": e}))
            for v, j, e in zip(rows["variant"].astype(object), rows["job_id"].astype(object),
                               rows["extra"].astype(object))]


def first_token_comparison(df: pd.DataFrame) -> Optimization:
    """Multi-sample generation: how many distinct first tokens N samples got. The broadcast
    baseline (one first token sampled and copied to every sample) comes from rows of variant
    "broadcast", or from an extra field first_token_distinct_broadcast next to the measured one."""
    opt = Optimization("independent first token", "first_token_distinct", "broadcast", "independent")
    # One figure per job (and side): every variant row of a job carries the same measurement.
    independent, broadcast, samples = {}, {}, set()
    for variant, job, extra in _first_token_rows(df):
        value = extra.get("first_token_distinct")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            (broadcast if variant == "broadcast" else independent)[job] = float(value)
            n = extra.get("diversity_samples", extra.get("num_samples"))
            if isinstance(n, int) and variant != "broadcast":
                samples.add(n)
        value = extra.get("first_token_distinct_broadcast")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            broadcast[job] = float(value)
    if independent:
        opt.optimized, opt.n_optimized = sum(independent.values()) / len(independent), len(independent)
        if samples:
            opt.optimized_label = f"independent, of {'/'.join(map(str, sorted(samples)))} samples"
    if broadcast:
        opt.baseline, opt.n_baseline = sum(broadcast.values()) / len(broadcast), len(broadcast)
    if not independent:
        opt.note = f"{NOT_MEASURED}: no inference row with first_token_distinct"
    elif not broadcast:
        opt.note = f"{NOT_MEASURED}: no broadcast baseline (it gave 1 distinct first token by construction)"
    return opt


def _not_applicable(df: pd.DataFrame, kind: str, metric: str, *whys: str) -> str:
    """Why this device cannot give the figure at all, or "" when it could have (then the pair is
    "not measured in this run"): a side whose rows were SKIPPED (kv-graph needs CUDA), or MFU on a
    CPU, whose peak FLOPs are not known."""
    for why in whys:
        if "(SKIPPED)" in why:
            return why.split("(SKIPPED)", 1)[1].lstrip(": ") or "skipped on this device"
    devices = set(df.loc[(df["kind"] == kind).fillna(False), "device_name"].dropna())
    if metric == "mfu" and devices == {"cpu"}:
        return "MFU needs the device's peak FLOPs, which are not known for a CPU"
    return ""


def optimizations(df: pd.DataFrame) -> list[Optimization]:
    out = []
    for name, kind, metric, base, opt in OPTIMIZATION_PAIRS:
        o = Optimization(name, metric, base[0], opt[0])
        o.baseline, o.n_baseline, why_b = _side(df, kind, base, metric)
        o.optimized, o.n_optimized, why_o = _side(df, kind, opt, metric)
        if o.baseline is None or o.optimized is None:
            o.note = f"{NOT_MEASURED}: " + "; ".join(w for w in (why_b, why_o) if w)
            o.not_applicable = _not_applicable(df, kind, metric, why_b, why_o)
        out.append(o)
    out.append(first_token_comparison(df))
    return out


# -----------------------------------------------------------------------------
# Figures per (stage, variant), and the comparison of runs against a baseline run

def run_figures(df: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """(stage, variant, metric) -> mean over COMPLETED rows; plus ("(run)", "", ...) totals."""
    figures = {}
    done = _completed(df)
    for (stage, variant), group in done.groupby([done["stage"].fillna(""), done["variant"].fillna("")]):
        for metric in FIGURE_METRICS:
            values = group[metric].dropna()
            if not values.empty:
                figures[(stage, variant, metric)] = float(values.astype("float64").mean())
    figures.update(eval_figures(done))
    for metric in ("gpu_hours", "cost"):
        values = df[metric].dropna()
        if not values.empty:
            figures[("(run)", "", metric)] = float(values.sum())
    return figures


def compare_runs(runs: list[RunData], baseline: RunData) -> list[dict]:
    """One line per (run, stage, variant, metric) present in either the run or the baseline:
    both values and the ratio run / baseline (None where a side was not measured)."""
    base = run_figures(baseline.rows)
    lines = []
    for run in runs:
        if run is baseline:
            continue
        figs = run_figures(run.rows)
        for key in sorted(set(base) | set(figs)):
            b, v = base.get(key), figs.get(key)
            lines.append({"run_id": run.run_id, "baseline_run_id": baseline.run_id, "stage": key[0],
                          "variant": key[1], "metric": key[2], "baseline": b, "value": v,
                          "ratio": v / b if b not in (None, 0) and v is not None else None})
    return lines


# -----------------------------------------------------------------------------
# The report card: evaluation stages (base_eval, chat_eval) keep their figures in `extra`

EVAL_KINDS = ("base_eval", "chat_eval")
EVAL_FIGURES = ["accuracy", "centered", "pass_at_1", "pass_at_k", "examples_per_s"]


def eval_table(df: pd.DataFrame) -> pd.DataFrame:
    """One line per evaluated task of the COMPLETED evaluation rows, its figures taken out of `extra`."""
    rows = df[df["kind"].isin(EVAL_KINDS) & (df["state"] == "COMPLETED")] if "kind" in df else df.iloc[:0]
    lines = []
    for _, r in rows.iterrows():
        extra = row_extra(r)
        lines.append({"stage": r["stage"], "task": r["variant"], "k": extra.get("k"), "first_token": extra.get("first_token"),
                      "num_examples": extra.get("num_examples"), "eval_seconds": extra.get("eval_seconds"),
                      "chance": extra.get("chance", extra.get("random_baseline")), "isolation": extra.get("isolation"),
                      **{m: extra.get(m) for m in EVAL_FIGURES}})
    # per stage: the tasks, then the combined metric (CORE, ChatCORE: the rows without an accuracy)
    lines.sort(key=lambda l: (str(l["stage"]), l["accuracy"] is None, str(l["task"])))
    return pd.DataFrame(lines)


def eval_figures(df: pd.DataFrame) -> dict[tuple[str, str, str], float]:
    """(stage, task, figure) -> value, for comparing runs (`jobs report RUN1 RUN2 --baseline RUN`)."""
    figures = {}
    for _, r in eval_table(df).iterrows():
        for m in EVAL_FIGURES:
            if r[m] is not None and not pd.isna(r[m]):
                figures[(str(r["stage"]).split(".")[0], str(r["task"]), m)] = float(r[m])
    return figures
