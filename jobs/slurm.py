"""
Slurm accounting (sacct) as the report sees it: state, elapsed time and exit code per job id.

Tolerant by design: where sacct is missing, has no accounting database, or times out, the answer
is "unavailable" with the reason, never an exception. Only Slurm job ids are asked about
(numeric, or NNN_T for an array task); local runs (job ids like local:<pid>) are skipped.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field

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


def parse_sacct(text: str) -> dict[str, SacctJob]:
    """Parse `sacct --noheader --parsable2 --format=JobID,State,ElapsedRaw,ExitCode` output.
    Job steps (123.batch, 123.0) are skipped: the allocation line carries the job's own figures."""
    jobs: dict[str, SacctJob] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 4 or not parts[0]:
            continue
        job_id, state, elapsed, exit_code = parts[:4]
        if "." in job_id:
            continue
        code, _, sig = exit_code.partition(":")
        jobs[job_id] = SacctJob(
            job_id=job_id,
            state=state.split()[0] if state.strip() else "",
            elapsed_s=_int_or_none(elapsed),
            exit_code=_int_or_none(code),
            signal=_int_or_none(sig),
        )
    return jobs


def query_sacct(job_ids, timeout_s: float = 30.0, sacct: str = "sacct") -> SacctResult:
    """Ask sacct about the Slurm job ids among `job_ids` (others are ignored).
    Returns SacctResult(available=False, reason=...) when sacct cannot answer."""
    wanted = sorted({j for j in job_ids if is_slurm_job_id(j)})
    if not wanted:
        return SacctResult(available=False, reason="no Slurm job ids (local run)")
    exe = shutil.which(sacct)
    if exe is None:
        return SacctResult(available=False, reason=f"{sacct} not found on PATH")
    # An explicit start time: without one, some Slurm versions only look at jobs since midnight.
    cmd = [exe, "--jobs", ",".join(wanted), "--allocations", "--noheader", "--parsable2",
           "--starttime", "2000-01-01", f"--format={SACCT_FORMAT}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return SacctResult(available=False, reason=f"sacct timed out after {timeout_s:.0f}s")
    except OSError as e:
        return SacctResult(available=False, reason=f"sacct could not run: {e}")
    if out.returncode != 0:
        err = (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
        return SacctResult(available=False, reason=f"sacct failed: {err}")
    jobs = parse_sacct(out.stdout)
    return SacctResult(available=True, jobs={j: jobs[j] for j in wanted if j in jobs})
