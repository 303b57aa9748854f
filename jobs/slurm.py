"""
Every call to a Slurm command (sbatch --test-only, sinfo, squeue, sacct, scancel, scontrol requeue),
and the one sacct parser. submitit submits the jobs themselves (jobs/submit.py).

Tolerant by design where the caller only reads (status, the report, the rehearsal's outcome): sacct
missing, without an accounting database, or timing out is an answer ("unavailable" and the reason),
never an exception. Only Slurm job ids are asked about (numeric, or NNN_T for an array task); local
runs (job ids like local:<pid>) are skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SLURM_JOB_ID = re.compile(r"^\d+(_\d+)?$")

# ElapsedRaw is the elapsed time in whole seconds, easier to trust than parsing [D-]HH:MM:SS.
SACCT_FORMAT = "JobID,State,ElapsedRaw,ExitCode"


@dataclass
class SacctJob:
    job_id: str
    state: str            # first word of sacct's State ("CANCELLED by 0" -> "CANCELLED")
    elapsed_s: int | None
    exit_code: int | None  # the job's exit status (the part before ':' in sacct's ExitCode)
    signal: int | None     # the signal that ended it, 0 if none (the part after ':')


@dataclass
class SacctResult:
    available: bool
    reason: str = ""                       # why not available, or "" when it was
    jobs: dict[str, SacctJob] = field(default_factory=dict)


def is_slurm_job_id(job_id) -> bool:
    return isinstance(job_id, str) and bool(SLURM_JOB_ID.match(job_id))


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_sacct_table(text: str, fields: list[str]) -> dict[str, dict[str, str]]:
    """`sacct --noheader --parsable2 --format=<fields>` output (JobID first) as {job id: {field: value}}.
    Job steps (123.batch, 123.0) are skipped: the allocation line carries the job's own figures."""
    table: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < len(fields) or not parts[0] or "." in parts[0]:
            continue
        table[parts[0]] = dict(zip(fields[1:], parts[1:]))
    return table


def sacct_table(job_ids, fields: list[str], timeout_s: float = 30.0, sacct: str = "sacct") -> tuple[dict | None, str]:
    """Ask sacct about the Slurm job ids among `job_ids` (an array's id covers its tasks): (table, "")
    as parse_sacct_table gives it, or (None, why) when sacct cannot answer."""
    wanted = sorted({j for j in job_ids if is_slurm_job_id(j)})
    if not wanted:
        return None, "no Slurm job ids (local run)"
    exe = shutil.which(sacct)
    if exe is None:
        return None, f"{sacct} not found on PATH"
    # An explicit start time: without one, some Slurm versions only look at jobs since midnight.
    cmd = [exe, "--jobs", ",".join(wanted), "--allocations", "--noheader", "--parsable2",
           "--starttime", "2000-01-01", f"--format={','.join(fields)}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"sacct timed out after {timeout_s:.0f}s"
    except OSError as e:
        return None, f"sacct could not run: {e}"
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
        return None, f"sacct failed: {err}"
    return parse_sacct_table(out.stdout, fields), ""


def _sacct_job(job_id: str, line: dict[str, str]) -> SacctJob:
    code, _, sig = line["ExitCode"].partition(":")
    state = line["State"]
    return SacctJob(job_id=job_id, state=state.split()[0] if state.strip() else "",
                    elapsed_s=_int_or_none(line["ElapsedRaw"]), exit_code=_int_or_none(code),
                    signal=_int_or_none(sig))


def parse_sacct(text: str) -> dict[str, SacctJob]:
    """The report's sacct lines (SACCT_FORMAT) as SacctJob per job id."""
    return {j: _sacct_job(j, line) for j, line in parse_sacct_table(text, SACCT_FORMAT.split(",")).items()}


def query_sacct(job_ids, timeout_s: float = 30.0, sacct: str = "sacct") -> SacctResult:
    """The report's view: state, elapsed seconds and exit code of the Slurm job ids among `job_ids`.
    Returns SacctResult(available=False, reason=...) when sacct cannot answer."""
    table, reason = sacct_table(job_ids, SACCT_FORMAT.split(","), timeout_s, sacct)
    if table is None:
        return SacctResult(available=False, reason=reason)
    wanted = {j for j in job_ids if is_slurm_job_id(j)}
    return SacctResult(available=True, jobs={j: _sacct_job(j, line) for j, line in table.items() if j in wanted})


def slurm_job_states(job_ids: list[str]) -> dict[str, dict]:
    """status's view: {job id (array tasks as A_T): {state, elapsed, start, end, exit_code}} from sacct,
    with squeue filling in jobs accounting has not recorded yet; "_squeue_ok" is there when squeue answered."""
    ids = sorted({j.split("_")[0] for j in job_ids if j})
    out: dict[str, dict] = {}
    if not ids:
        return out
    table, _ = sacct_table(ids, ["JobID", "State", "Elapsed", "Start", "End", "ExitCode"])
    for jid, line in (table or {}).items():
        out[jid] = {"state": line["State"].split()[0] if line["State"] else "UNKNOWN", "elapsed": line["Elapsed"],
                    "start": line["Start"], "end": line["End"], "exit_code": line["ExitCode"]}
    try:
        # only this run's jobs (not the whole cluster's queue: thousands of lines on a big cluster).
        # squeue -j fails with "Invalid job id" when none of the ids is queued any more (Slurm 22.05
        # with a single id): that is an answer too, "none of them is queued".
        res = subprocess.run(["squeue", "--me", "-h", "-j", ",".join(ids), "-o", "%i|%T|%M"],
                             capture_output=True, text=True, timeout=30)
        if res.returncode == 0 or "Invalid job id" in res.stderr:
            out["_squeue_ok"] = {"state": "OK"}
        for line in res.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0].split("_")[0] in ids:
                out[parts[0]] = {**out.get(parts[0], {}), "state": parts[1], "elapsed": parts[2]}
    except (OSError, subprocess.TimeoutExpired):
        pass
    return out


def slurm_available() -> bool:
    """sbatch on PATH and sinfo answers (a controller is reachable)."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0


def usable_nodes() -> list[str]:
    """The nodes sinfo shows up (idle, mixed, allocated, completing), sorted."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30).stdout
    return sorted({ln.split()[0] for ln in out.splitlines()
                   if len(ln.split()) > 1 and ln.split()[1].rstrip("*~#!%$@^-+") in {"idle", "mix", "alloc", "comp"}})


def sbatch_test_only(path: Path) -> dict:
    """Ask the controller whether the script's request fits (`sbatch --test-only`): {ok, answer}."""
    try:
        res = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"ok": False, "answer": f"sbatch --test-only did not answer: {e}"}
    answer = " ".join((res.stderr + res.stdout).split())
    return {"ok": res.returncode == 0, "answer": answer or f"exit {res.returncode}"}


def scancel(job_ids: list[str]) -> None:
    """Cancel the jobs; what scancel says is not read (a job already gone is not an error here)."""
    subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)


def requeue(job_id: str) -> None:
    """Put the job back in the queue (raises when scontrol refuses: the stage then fails instead)."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
