"""The scale-out example (examples/nginx, docs/server-scaleout.md): `examples/nginx/run` starts
two `sparsellm serve` replicas on loopback and nginx in front of them (round-robin). Requests
sent through nginx, streaming and not, must all succeed, and each replica's own /metrics must
show that it served some of them.

Needs nginx (Debian package `nginx`). Without it the test is skipped, unless
SPARSELLM_REQUIRE_NGINX=1 (.ci/run sets it, after installing nginx), which makes it fail.
"""

import os
import re
import shutil
import signal
import subprocess
import time

import httpx
import openai
import pytest
from server_testlib import REPO, free_port, sparsellm_bin

N_PLAIN, N_STREAM = 4, 2


def find_nginx() -> str | None:
    for candidate in (os.environ.get("NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def parse_prometheus(text: str) -> list:
    """Samples of a Prometheus text exposition: (name, {label: value}, float)."""
    samples = []
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if m:
            samples.append((m.group(1), dict(label_re.findall(m.group(3) or "")), float(m.group(4))))
    return samples


def completion_requests(metrics_text: str) -> float:
    """Requests to the two completion endpoints that a replica counted in its /metrics."""
    total = 0.0
    for name, labels, value in parse_prometheus(metrics_text):
        if "request" not in name or not name.endswith("_total"):
            continue
        endpoint = labels.get("endpoint") or labels.get("path") or labels.get("route") or ""
        if "completions" in endpoint:
            total += value
    return total


@pytest.fixture(scope="module")
def nginx_example(log_dir):
    nginx = find_nginx()
    if nginx is None:
        msg = "nginx not found (Debian: apt-get install nginx)"
        if os.environ.get("SPARSELLM_REQUIRE_NGINX") == "1":
            pytest.fail(msg + "; SPARSELLM_REQUIRE_NGINX=1 requires this test to run")
        pytest.skip(msg)
    port, r1, r2 = free_port(), free_port(), free_port()
    while len({port, r1, r2}) < 3:
        r2 = free_port()
    workdir = REPO / "target" / "test-data" / f"nginx-example-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PORT=str(port), REPLICA_PORTS=f"{r1} {r2}", SPARSELLM=str(sparsellm_bin()),
               NGINX=nginx, WORKDIR=str(workdir))
    log_path = log_dir / f"nginx-example-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(REPO / "examples" / "nginx" / "run"), "--threads", "1", "--parallel", "2"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"examples/nginx/run exited with {proc.returncode}:\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"nginx on {url} not answering /health after 180 s; log {log_path}")
            time.sleep(0.2)
        yield {"url": url, "replicas": [f"http://127.0.0.1:{r1}", f"http://127.0.0.1:{r2}"]}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        # Whatever is left of the process group this fixture started (normally nothing).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        assert code == 0, f"examples/nginx/run did not stop cleanly on SIGTERM ({code}); log {log_path}"


def test_requests_through_nginx_reach_both_replicas(nginx_example):
    before = [completion_requests(httpx.get(r + "/metrics", timeout=10).text) for r in nginx_example["replicas"]]
    client = openai.OpenAI(base_url=nginx_example["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    for i in range(N_PLAIN):
        r = client.completions.create(model="m", prompt=f"Count to {i + 3}:", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens > 0
    for i in range(N_STREAM):
        stream = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Say hello {i}"}], max_tokens=6,
            temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        # Token by token through the proxy (proxy_buffering off), usage last.
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    after = [completion_requests(httpx.get(r + "/metrics", timeout=10).text) for r in nginx_example["replicas"]]
    served = [a - b for a, b in zip(after, before)]
    assert sum(served) == N_PLAIN + N_STREAM, f"replicas counted {served} completion requests"
    assert all(s > 0 for s in served), f"round-robin should use both replicas, they served {served}"

