"""
One task of a Slurm job array over a grid: pick the grid row of this task, run a command built
from that row, and write the task's result row.

    python -m jobs.array GRID.yaml [--task I] [--run-id RUN] [--results-dir DIR] -- CMD ARG ...
    python -m jobs.array GRID.yaml --count        # rows in the grid (for sbatch --array=0-<count-1>)
    python -m jobs.array GRID.yaml --list         # the rows, one JSON object per line

The grid file (YAML, every key optional except one of rows/grid):

    name: probe                 # stage name written in the result rows (default: the file's stem)
    kind: probe                 # result-row kind (default: "array")
    defaults: {seq_len: 2048}   # values every row gets unless the row sets them
    grid:                       # the cartesian product, first key varying slowest ...
      depth: [12, 20]
      num_samples: [1, 4]
    rows:                       # ... or an explicit list of rows (or both: rows come first)
      - {depth: 26, num_samples: 1}
    command: [python, -c, ...]  # used when no command follows "--"

The command's arguments are templates: "{depth}" becomes the row's depth; "{python}" (this
interpreter), "{task}", "{run_id}" and "{results_dir}" are always there. The task comes from --task,
else SLURM_ARRAY_TASK_ID. The command prints one JSON object as its last stdout line (the
contract of `python -m jobs ... --json`); its keys that are result-row columns fill those columns,
the others go to `extra`. The row goes to <results_dir>/rows/ (jobs.rows.write_row, atomic), where
results_dir is --results-dir, else <results root>/<run id>, the run id being --run-id, else the array's
job id. A row is written whatever the outcome; the exit code is the command's (1 when it printed no
JSON), so Slurm's view and the row agree.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

from nanochat.errors import ConfigError
from nanochat.files import git_commit

GRID_KEYS = {"name", "kind", "defaults", "grid", "rows", "command"}
BUILTIN_FIELDS = ("python", "task", "run_id", "results_dir")


def load_grid(path: str | os.PathLike) -> dict:
    """Read and check a grid file; returns {"name", "kind", "rows": [dict, ...], "command": [str] | None}."""
    from jobs.spec import read_yaml
    path = Path(path)
    spec = read_yaml(path, "a grid file is a mapping with 'grid' and/or 'rows'")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(GRID_KEYS))})")
    defaults = spec.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: 'defaults' must be a mapping")
    rows: list[dict] = []
    for i, row in enumerate(spec.get("rows") or []):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}: rows[{i}] must be a mapping of parameter: value")
        rows.append({**defaults, **row})
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: 'grid' must be a mapping of parameter: [values]")
    if grid:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid.{key} must be a non-empty list of values")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            rows.append({**defaults, **dict(zip(keys, combo))})
    if not rows:
        raise ConfigError(f"{path}: the grid has no rows (give 'grid' or 'rows')")
    for key in BUILTIN_FIELDS:
        if any(key in row for row in rows):
            raise ConfigError(f"{path}: parameter '{key}' is reserved (filled in by jobs.array)")
    command = spec.get("command")
    if command is not None and (not isinstance(command, list) or not command
                                or not all(isinstance(a, (str, int, float)) for a in command)):
        raise ConfigError(f"{path}: 'command' must be a non-empty list of arguments")
    name = str(spec.get("name") or path.stem)
    from jobs.spec import VARIANT_NAME_RE
    if not VARIANT_NAME_RE.fullmatch(name) or ".." in name:  # it names the row files: rows/<name>__<job>.json
        raise ConfigError(f"{path}: name {name!r}: letters, digits, _, - and . only (no '/' or '..')")
    return {"name": name, "kind": str(spec.get("kind") or "array"),
            "rows": rows, "command": [str(a) for a in command] if command else None, "path": str(path)}


def render_command(template: list[str], fields: dict, source: str) -> list[str]:
    """Fill "{key}" placeholders of each argument from fields; a missing key is bad input."""
    out = []
    for arg in template:
        for _, name, _, _ in string.Formatter().parse(arg):
            if name is not None and name != "" and name not in fields:
                raise ConfigError(f"{source}: command placeholder '{{{name}}}' is not a parameter of the row "
                                  f"(row has: {', '.join(sorted(fields))})")
        try:
            out.append(arg.format_map(fields))
        except (ValueError, IndexError, AttributeError, KeyError) as e:
            raise ConfigError(f"{source}: bad placeholder in command argument {arg!r} ({e})") from None
    return out


def pick_task(task: int | None) -> int:
    if task is not None:
        return task
    env = os.environ.get("SLURM_ARRAY_TASK_ID")
    if env is None:
        raise ConfigError("SLURM_ARRAY_TASK_ID: not set (outside a job array give --task I)")
    if not env.isdigit():
        raise ConfigError(f"SLURM_ARRAY_TASK_ID={env!r}: not a task index")
    return int(env)


def default_run_id() -> str:
    return (os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
            or time.strftime("array-%Y%m%d-%H%M%S", time.gmtime()))


def _pump(stream, sink, keep: list[str]) -> None:
    """Copy a child's stream line by line to ours (so the Slurm log shows it), keeping the last lines."""
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        if line.strip():
            keep.append(line.rstrip("\n"))
            del keep[:-20]
    stream.close()


def run_command(argv: list[str]) -> tuple[int, list[str], list[str], str | None]:
    """Run argv; returns (exit code, last stdout lines, last stderr lines, signal name if we were told to stop).
    SIGTERM/SIGINT (scancel, time limit) are passed on to the child, so its row still gets written."""
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    except OSError as e:
        return 127, [], [f"cannot run {argv[0]!r}: {e}"], None
    out_lines: list[str] = []
    err_lines: list[str] = []
    stopped: list[str] = []

    def forward(signum, _frame):
        stopped.append(signal.Signals(signum).name)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pumps = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, out_lines), daemon=True),
                 threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, err_lines), daemon=True)]
        for t in pumps:
            t.start()
        rc = proc.wait()
        for t in pumps:
            t.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return rc, out_lines, err_lines, (stopped[0] if stopped else None)


def parse_result(out_lines: list[str]) -> dict | None:
    """The last stdout line as a JSON object, or None."""
    if not out_lines:
        return None
    try:
        obj = json.loads(out_lines[-1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def run_task(grid: dict, task: int, template: list[str], run_id: str, results_dir: Path) -> tuple[int, dict, Path]:
    """Run one grid row's command and write its result row. Returns (exit code, row, row path)."""
    from jobs.rows import make_row, utc_now, write_row

    rows = grid["rows"]
    if not 0 <= task < len(rows):
        raise ConfigError(f"{grid['path']}: task {task} is beyond the grid's {len(rows)} rows "
                          f"(submit with --array=0-{len(rows) - 1})")
    params = rows[task]
    fields = {**params, "python": sys.executable, "task": task, "run_id": run_id, "results_dir": str(results_dir)}
    argv = render_command(template, fields, grid["path"])
    print(f"[jobs.array] run {run_id} task {task}/{len(rows)}: {shlex.join(argv)}", file=sys.stderr, flush=True)

    started_at = utc_now()
    t0 = time.perf_counter()
    rc, out_lines, err_lines, stopped = run_command(argv)
    wall = time.perf_counter() - t0
    result = parse_result(out_lines)

    if stopped:
        state, error = "FAILED", f"stopped by {stopped} (scancel or time limit)"
    elif rc != 0:
        state, error = "FAILED", f"exit code {rc}: {err_lines[-1] if err_lines else 'no stderr'}"
    elif result is None:
        state, error = "FAILED", "the command's last stdout line is not a JSON object"
    else:
        state, error = "COMPLETED", None
    # Grid parameters first (inputs), then what the command measured; ours last (they describe this task).
    fields = {**params, **(result or {})}
    fields.update(run_id=run_id, stage=grid["name"], kind=grid["kind"], array_task=task, started_at=started_at,
                  wall_time_s=round(wall, 3), git_commit=git_commit(), grid_row=params, command=shlex.join(argv))
    if result is None or state != "COMPLETED" or "state" not in result:
        fields["state"] = state
    if error:
        fields["error"] = error
    row = make_row(**fields)
    path = write_row(results_dir, row)
    print(f"[jobs.array] task {task}: {row['state']} in {wall:.1f} s -> {path}", file=sys.stderr, flush=True)
    if rc == 0 and result is None:
        rc = 1
    return rc, row, path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    template: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, template = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(prog="python -m jobs.array",
                                description="run one task of a job array over a YAML grid and write its result row",
                                epilog="everything after -- is the command template, e.g. "
                                       "-- {python} -m jobs probe --depth {depth} --json")
    p.add_argument("grid", help="grid YAML file")
    p.add_argument("--task", type=int, default=None, help="row index (default: SLURM_ARRAY_TASK_ID)")
    p.add_argument("--run-id", default=None, help="run id (default: the array's job id)")
    p.add_argument("--results-dir", default=None, help="where rows/ goes (default: <results root>/<run id>)")
    p.add_argument("--count", action="store_true", help="print the number of rows and exit")
    p.add_argument("--list", action="store_true", help="print the rows, one JSON object per line, and exit")
    args = p.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        if args.count:
            print(len(grid["rows"]))
            return 0
        if args.list:
            for row in grid["rows"]:
                print(json.dumps(row, sort_keys=True, default=str))
            return 0
        template = template or grid["command"] or []
        if not template:
            raise ConfigError(f"{args.grid}: no command (give one after -- or a 'command' key)")
        task = pick_task(args.task)
        run_id = args.run_id or default_run_id()
        if args.results_dir:
            results_dir = Path(args.results_dir)
        else:
            from jobs.runs import results_root
            results_dir = results_root() / run_id
        rc, _, _ = run_task(grid, task, template, run_id, results_dir)
        return rc
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
