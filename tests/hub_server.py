"""The tests' hub: jobs.local_hub.LocalHub (a real HTTP server on 127.0.0.1 that answers what
huggingface_hub asks, with injected faults), shared with the rehearsal command."""
from jobs.local_hub import LocalHub as FakeHub  # noqa: F401
