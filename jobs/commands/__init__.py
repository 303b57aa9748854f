"""The command line's verbs beyond the run's own (submit, status, cancel, resume: jobs/cli.py), one module
each, named after its command: add_arguments(parser) and run(args) -> int. jobs/cli.py imports a verb's
module only when that verb runs."""
