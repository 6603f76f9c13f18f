"""Streaming OpenAI-API client pieces shared by scripts/bench_serve.py and scripts/load_test.py.

Talks to any OpenAI-compatible server (`sparsellm serve`, llama.cpp's `llama-server`) with
httpx (PyPI) over SSE: one request, the arrival time of every streamed chunk, the server's
`usage`. Also starts and stops server processes and waits for their /health.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

import httpx

# Distinct plain-English prompts, so that no two concurrent streams share a prefix that a
# prompt cache could reuse. Index i goes to stream i.
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "A recipe for a simple vegetable soup starts with onions, carrots and",
    "The main difference between a comet and an asteroid is that",
    "In the early morning the harbour was quiet, and the fishing boats",
    "To configure a home network router for the first time, you should",
    "The theory of plate tectonics explains why mountains form where",
    "Our quarterly report shows that sales in the northern region",
    "When learning to play the violin, beginners often struggle with",
    "The old lighthouse keeper kept a diary, and on the first page he wrote",
    "Photosynthesis converts light energy into chemical energy by",
    "The committee met on Tuesday to discuss the budget for the new library, and",
    "A good night's sleep matters for memory because the brain",
    "The train left the station twenty minutes late because",
    "Bees communicate the location of flowers to each other by",
    "The first computers filled entire rooms and used vacuum tubes that",
    "On the northern coast of the island, the villagers celebrate a festival in which",
]


def prompt_for(i: int) -> str:
    """Prompt for stream i; beyond the list, a numbered variant (still distinct)."""
    p = PROMPTS[i % len(PROMPTS)]
    return p if i < len(PROMPTS) else f"Story {i // len(PROMPTS)}. {p}"


@dataclass
class StreamResult:
    """One streamed request, timed on the client (time.perf_counter seconds)."""

    sent: float
    chunk_times: list = field(default_factory=list)  # arrival of each chunk carrying text
    completion_tokens: int = 0  # from the server's usage (0 when it sent none)
    prompt_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None

    @property
    def first(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def last(self) -> float | None:
        return self.chunk_times[-1] if self.chunk_times else None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def tokens(self) -> int:
        """Completion tokens: the server's usage, else the number of text chunks."""
        return self.completion_tokens or len(self.chunk_times)

    def tokens_between(self, t0: float, t1: float) -> float:
        """Tokens that arrived in (t0, t1], counting each chunk as tokens()/chunks (chunks
        are one token each unless the server held back an incomplete UTF-8 sequence)."""
        if not self.chunk_times:
            return 0.0
        per_chunk = self.tokens() / len(self.chunk_times)
        return per_chunk * sum(1 for t in self.chunk_times if t0 < t <= t1)


def completion_payload(prompt: str, max_tokens: int, **extra) -> dict:
    """A greedy /v1/completions streaming request of exactly max_tokens tokens: ignore_eos
    (llama-server's field, which sparsellm serve accepts) so generation never stops early,
    and cache_prompt false so llama-server redoes the prefill as sparsellm does."""
    body = {
        "model": "default",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "cache_prompt": False,
    }
    body.update(extra)
    return body


async def stream_completion(
    client: httpx.AsyncClient, base_url: str, body: dict, api_key: str | None = None
) -> StreamResult:
    """POST one streaming request to {base_url}/v1/completions (or /v1/chat/completions when
    body has "messages") and time its chunks. Never raises: failures land in .error."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = StreamResult(sent=time.perf_counter())
    try:
        async with client.stream("POST", base_url + path, json=body, headers=headers) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                res.error = f"HTTP {r.status_code}: {text[:200]}"
                return res
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                msg = json.loads(data)
                if "error" in msg:
                    res.error = f"stream error: {json.dumps(msg['error'])[:200]}"
                    return res
                for choice in msg.get("choices") or []:
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text:
                        res.chunk_times.append(now)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = msg.get("usage")
                if usage:
                    res.completion_tokens = usage.get("completion_tokens", 0)
                    res.prompt_tokens = usage.get("prompt_tokens", 0)
            if not done:
                res.error = "stream ended without data: [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def percentile(values: list, q: float) -> float:
    """q-th percentile (0..100), linear interpolation between order statistics; NaN if empty."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process started from argv, stopped with SIGTERM (SIGKILL after 10 s).
    Its output goes to log_path."""

    def __init__(self, name: str, argv: list, port: int, log_path: str, env=None):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + open(self.log_path, errors="replace").read()[-2000:])
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not healthy after {timeout} s; log: {self.log_path}")

    def cpu_seconds(self) -> float:
        """utime + stime of the process so far (to check an idle server stays idle)."""
        fields = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def run(coro):
    return asyncio.run(coro)
