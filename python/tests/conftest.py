"""Shared fixtures of the Python package's tests (run by scripts/test after
`pip install ./python`): the repository's paths, the CLI binary to compare against, and
models loaded once per session."""

import json
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
# As the Rust tests: the default model lives in $SPARSELLM_MODELS_DIR, default ./models at
# the repository root (never fetched from the network by a test that finds it there).
os.environ.setdefault("SPARSELLM_MODELS_DIR", str(REPO / "models"))


def cli_path() -> pathlib.Path:
    """The `sparsellm` binary: $SPARSELLM_BIN, else target/release/sparsellm (built by
    `cargo test --release`, which scripts/test runs first)."""
    p = pathlib.Path(os.environ.get("SPARSELLM_BIN") or REPO / "target" / "release" / "sparsellm")
    if not p.exists():
        pytest.fail(f"{p} not found: build it with `cargo build --release` (scripts/test does)")
    return p


def cli_json(*args: str) -> dict:
    """Runs the CLI with `args` (a command and its flags) plus --json and parses its output."""
    out = subprocess.run([str(cli_path()), *args, "--json"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, f"sparsellm {' '.join(args)}: {out.stderr}"
    return json.loads(out.stdout)


@pytest.fixture(scope="session")
def model():
    import sparsellm

    return sparsellm.Model()


@pytest.fixture(scope="session")
def sparse_model():
    import sparsellm

    return sparsellm.Model(sparsity="density:0.5")


@pytest.fixture(scope="session")
def f32_model():
    import sparsellm

    return sparsellm.Model(dtype="f32")
