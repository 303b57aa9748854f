"""The tests' hub: jobs.local_hub.LocalHub (a real HTTP server on 127.0.0.1 that answers what
huggingface_hub asks, with injected faults), shared with the rehearsal command, and the `hub`
fixture that points huggingface_hub at it (a test module takes it with `pytest_plugins = ["hub_server"]`)."""
import pytest

from jobs.local_hub import LocalHub as FakeHub


@pytest.fixture
def hub(monkeypatch):
    h = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "ENDPOINT", h.endpoint)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", h.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    yield h
    h.stop()


__all__ = ["FakeHub", "hub"]
