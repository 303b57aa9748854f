"""Orchestration: pipeline specs, submission through submitit (Slurm or local), run bookkeeping,
stage entry points, the command line and the report builder. Imports nanochat; never the reverse."""
