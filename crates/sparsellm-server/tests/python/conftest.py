"""Fixtures of the server's tests with third-party clients (helpers: server_testlib.py)."""

import pathlib

import pytest
from server_testlib import API_KEY, REPO, Serve


@pytest.fixture(scope="session")
def log_dir() -> pathlib.Path:
    d = REPO / "target" / "test-data" / "server-logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def server(log_dir):
    """A server with an API key, a 2048-token context per request (an overflow is cheap to
    provoke) and room for a few concurrent streams."""
    s = Serve(log_dir, "--api-key", API_KEY, "--parallel", "4", "--ctx-size", "2048", "--threads", "2")
    yield s
    code = s.stop()
    assert code == 0, f"sparsellm serve exited with {code} on SIGTERM; log {s.log_path}"
