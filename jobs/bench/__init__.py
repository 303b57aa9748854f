"""The benchmarks of `python -m jobs bench WHICH` (jobs/commands/bench.py dispatches): each optimization
against its baseline on this machine, one module per WHICH, each with add_arguments(parser) and run(args)."""
