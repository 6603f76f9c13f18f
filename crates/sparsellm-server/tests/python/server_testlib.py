"""Helpers of the server's tests with third-party clients (run by scripts/test after the
Python package step, in the same venv, which has `openai` and `httpx` from PyPI): the
repository's paths, and `sparsellm serve` processes on free loopback ports. (A module of its
own rather than conftest.py, whose name python/tests' conftest also has.)"""

import os
import pathlib
import signal
import socket
import subprocess
import time

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[4]
# As the Rust tests: the default model lives in $SPARSELLM_MODELS_DIR, default ./models.
if not os.environ.get("SPARSELLM_MODELS_DIR"):  # empty counts as unset, as for the engine
    os.environ["SPARSELLM_MODELS_DIR"] = str(REPO / "models")
API_KEY = "sk-test-0123456789"


def sparsellm_bin() -> pathlib.Path:
    """$SPARSELLM_BIN, else target/release/sparsellm (built by `cargo test --release`)."""
    p = pathlib.Path(os.environ.get("SPARSELLM_BIN") or REPO / "target" / "release" / "sparsellm")
    if not p.exists():
        pytest.fail(f"{p} not found: build it with `cargo build --release` (scripts/test does)")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: pathlib.Path, timeout: float = 120.0) -> None:
    """Polls url + /health until 200; fails with the process's log if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url}/health not 200 after {timeout} s; log {log}")


class Serve:
    """One `sparsellm serve` on a free loopback port; stop() sends SIGTERM and returns the
    exit code (the server must exit 0 after ending its streams)."""

    def __init__(self, log_dir: pathlib.Path, *args: str, name: str = "serve"):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.log = open(self.log_path, "wb")
        argv = [str(sparsellm_bin()), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        wait_healthy(self.base_url, self.proc, self.log_path)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.log.close()
                pytest.fail(f"{self.proc.args} did not exit within 30 s of SIGTERM")
        self.log.close()
        return self.proc.returncode
