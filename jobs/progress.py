"""
Live progress: where each stage is, read from what the stages already write.

One line per stage (one per task of an array): state, step/total, loss, tokens/s, MFU, elapsed
and ETA. Training stages write their metrics CSV (nanochat.training.metrics.write_metrics: step, loss,
tokens_per_s, mfu, elapsed_s, ...) into their out_dir as they go; the data stage's progress is the
shards present in the work directory out of those it fetches. The total of steps comes from the
stage's arguments (num_steps, or the token budget over total_batch_size, as the training loop
computes it; max_steps for SFT); "?" where it is known only once the stage ran its probe.

`Watcher` follows a run while `submit --wait` (or `resume`) or `status --watch` waits: on a
terminal it redraws a rich table in place; elsewhere (a pipe, a log file, --json) it prints a plain
line for a stage each time its step or state changes.
"""
from __future__ import annotations

import csv
import sys
import threading
from pathlib import Path


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def read_last_rows(path: Path) -> list[dict]:
    """The metrics CSV's rows (a file rewritten atomically, so never half a row); [] when absent."""
    try:
        with open(path, newline="") as f:
            return [r for r in csv.DictReader(f) if (r.get("step") or "").isdigit()]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def total_steps(stage) -> int | None:
    """The optimizer steps a training stage will run, from its arguments; None when not known yet."""
    args = stage.args
    if stage.kind == "sft":
        return int(args["max_steps"]) if args.get("max_steps") else None
    if stage.kind not in ("base_train", "mid_train"):
        return None
    if args.get("num_steps"):
        return int(args["num_steps"])
    try:
        from jobs.data_plan import stage_config, training_tokens
        tokens, _ = training_tokens(stage)
        total = stage_config(stage).total_batch_size
        return int(tokens // total) if tokens and total else None
    except Exception:       # a kind without these keys: no total, the line still shows the step
        return None


def _data_progress(run: dict, stage) -> dict:
    """Shards present of those the data stage fetches (the progress bar of the data stage)."""
    name, shards = stage.args.get("pretraining") or "", int(stage.args.get("num_shards") or 0)
    if not name or shards <= 0:
        return {}
    try:
        from nanochat import fetch
        ds = fetch.pretraining_set(name)
        present = len(fetch.present(fetch.pretraining_dir(Path(run["workdir"]), name), fetch.shard_files(ds, shards)))
    except Exception:
        return {}
    return {"step": present, "total": shards, "unit": "shards"}


def stage_lines(run: dict, pipeline, status: dict) -> list[dict]:
    """[{stage, state, step, total, loss, tokens_per_s, mfu, elapsed_s, eta_s}] for every stage
    (one per array task), from the stages' metrics files."""
    from jobs.stages import stage_out_dir
    lines = []
    for name, stage in pipeline.stages.items():
        info = status["stages"].get(name, {})
        tasks = [(v.name, stage_out_dir(run, name) / v.name) for v in stage.variants] or [(None, stage_out_dir(run, name))]
        for variant, out_dir in tasks:
            line = {"stage": name if variant is None else f"{name}.{variant}", "state": info.get("state", "?"),
                    "step": None, "total": None, "loss": None, "tokens_per_s": None, "mfu": None,
                    "elapsed_s": None, "eta_s": None, "unit": "steps"}
            if stage.kind == "data":
                line.update(_data_progress(run, stage))
            else:
                rows = read_last_rows(out_dir / "metrics.csv")
                line["total"] = total_steps(stage) if variant is None else total_steps(_with_args(stage, variant))
                if rows:
                    last = rows[-1]
                    # the stage's own count once it runs (SFT's depends on its data; max_steps is a cap)
                    line["total"] = int(_float(last.get("num_steps")) or 0) or line["total"]
                    line.update(step=int(last["step"]), loss=_float(last.get("loss")),
                                tokens_per_s=_float(last.get("tokens_per_s")), mfu=_float(last.get("mfu")),
                                elapsed_s=_float(last.get("elapsed_s")))
                    first = rows[0]
                    steps, secs = int(last["step"]) - int(first["step"]), (_float(last.get("elapsed_s")) or 0) - (_float(first.get("elapsed_s")) or 0)
                    if line["total"] and steps > 0 and secs > 0 and line["state"] not in ("COMPLETED",):
                        line["eta_s"] = max(0.0, (line["total"] - line["step"]) * secs / steps)
            # the stage's wall time (start-up and data loading included) where the scheduler knows it
            wall = info.get("elapsed")
            wall = float(wall) if isinstance(wall, (int, float)) else _slurm_seconds(wall) if isinstance(wall, str) else None
            line["elapsed_s"] = wall if wall is not None else line["elapsed_s"]
            if line["state"] == "PENDING":
                line["elapsed_s"] = None   # sacct says 00:00:00 for a job that has not started
            lines.append(line)
    return lines


def _with_args(stage, variant_name):
    import dataclasses
    v = next(v for v in stage.variants if v.name == variant_name)
    return dataclasses.replace(stage, args={**stage.args, **v.args})


def _slurm_seconds(text: str) -> float | None:
    """sacct/squeue elapsed ([D-]HH:MM:SS or MM:SS) in seconds."""
    try:
        days, _, hms = text.rpartition("-")
        parts = [float(p) for p in hms.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        return secs + (float(days) * 86400 if days else 0)
    except ValueError:
        return None


def _dur(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fields(line: dict) -> dict[str, str]:
    """The line's columns as text."""
    step = "-" if line["step"] is None else f"{line['step']}/{line['total'] or '?'}"
    if line.get("unit") == "shards" and line["step"] is not None:
        step += " shards"
    return {"stage": line["stage"], "state": line["state"], "step": step,
            "loss": "-" if line["loss"] is None else f"{line['loss']:.4f}",
            "tok/s": "-" if line["tokens_per_s"] is None else f"{line['tokens_per_s']:,.0f}",
            "MFU": "-" if line["mfu"] is None else f"{line['mfu']:.2%}" if line["mfu"] < 1 else f"{line['mfu']:.1f}%",
            "elapsed": _dur(line["elapsed_s"]), "ETA": _dur(line["eta_s"])}


def plain_line(line: dict) -> str:
    f = fields(line)
    return (f"  {f['stage']:<20} {f['state']:<10} step {f['step']:<12} loss {f['loss']:<8} tok/s {f['tok/s']:<9} "
            f"MFU {f['MFU']:<7} elapsed {f['elapsed']:<7} ETA {f['ETA']}")


def table(lines: list[dict], title: str = ""):
    """A rich renderable: the stage lines, a bar where the total is known."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    t = Table(title=title or None, title_justify="left", expand=False, box=None, pad_edge=False)
    for col, justify in (("stage", "left"), ("state", "left"), ("progress", "left"), ("step", "right"),
                         ("loss", "right"), ("tok/s", "right"), ("MFU", "right"), ("elapsed", "right"), ("ETA", "right")):
        t.add_column(col, justify=justify, no_wrap=True)
    colour = {"COMPLETED": "green", "RUNNING": "cyan", "FAILED": "red", "CANCELLED": "yellow"}
    for line in lines:
        f = fields(line)
        total = line["total"] or (1 if line["state"] == "COMPLETED" else None)
        done = line["step"] if line["step"] is not None else (1 if line["state"] == "COMPLETED" else 0)
        bar = ProgressBar(total=total, completed=min(done, total) if total else 0, width=20) if total else ""
        t.add_row(f["stage"], f"[{colour.get(line['state'], 'white')}]{f['state']}[/]", bar, f["step"], f["loss"],
                  f["tok/s"], f["MFU"], f["elapsed"], f["ETA"])
    return t


class Watcher:
    """Follows a run in a background thread while the caller waits for it.

    live: redraw a rich table in place (a terminal); else print a plain line for each stage whose
    (state, step) changed. `status` gives the latest run status (the caller's, so Slurm is asked
    once per poll); without it the watcher asks jobs.runs.run_status itself."""

    def __init__(self, run_dir: Path, live: bool, poll_s: float = 2.0, out=None):
        from jobs import runs
        self.run_dir = Path(run_dir)
        self.run, self.pipeline, _ = runs.load_run(self.run_dir)
        self.live_mode = live
        self.poll_s = poll_s
        self.out = out or sys.stdout
        self.latest_status = None
        self.seen: dict[str, tuple] = {}
        self._stop = threading.Event()
        self._thread = None
        self._live = None

    def lines(self) -> list[dict]:
        from jobs import runs
        status = self.latest_status or runs.run_status(self.run_dir)
        return stage_lines(self.run, self.pipeline, status)

    def print(self, message: str) -> None:
        """A message (a state change) above the live table, or a plain line."""
        if self._live is not None:
            self._live.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=self.out, flush=True)

    def tick(self) -> None:
        lines = self.lines()
        if self._live is not None:
            self._live.update(table(lines, f"run {self.run['run_id']}"))
            return
        for line in lines:
            key = (line["state"], line["step"])
            if self.seen.get(line["stage"]) != key and line["step"] is not None:   # states: the caller's messages
                self.seen[line["stage"]] = key
                print(plain_line(line), file=self.out, flush=True)

    def _loop(self):
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:   # a half-written jobs.json, a file gone: the next tick sees it
                pass

    def __enter__(self):
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live
            self._live = Live(table(self.lines(), f"run {self.run['run_id']}"), console=Console(file=self.out),
                              refresh_per_second=2, transient=False)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="progress")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.tick()      # the final state of every stage
        except Exception:
            pass
        if self._live is not None:
            self._live.__exit__(*exc)
            self._live = None
        return False


def use_live(as_json: bool, out=None) -> bool:
    """Redraw in place only on a terminal and without --json."""
    out = out or sys.stdout
    return not as_json and hasattr(out, "isatty") and out.isatty()
