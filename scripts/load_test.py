#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server: N concurrent streaming clients for a fixed
time, then errors, TTFT p50/p99 and aggregate tokens/s. Exits 1 if any request failed.

    target/py/bin/python scripts/load_test.py http://127.0.0.1:8080 --clients 8 --duration 60
    # soak: 10 minutes, the server's RSS (VmRSS, peak VmHWM) printed every minute
    target/py/bin/python scripts/load_test.py http://127.0.0.1:8080 --clients 8 --soak 600 --pid PID

Each client loops over: one streaming request (/v1/completions by default, --chat for
/v1/chat/completions), greedy, max_tokens with ignore_eos so every request has the same
length, a prompt that differs per request; the next request starts when the previous one
ends. Requests still running at the deadline are finished and counted (tokens/s divides by the
time until the last one ended). With --soak, the run is judged flat when the peak RSS at the
end is within --max-rss-growth of the peak after the first interval (warm-up: KV buffers,
allocator arenas); otherwise exit 1.
"""
import argparse
import asyncio
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_client import completion_payload, percentile, prompt_for, stream_completion  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url", help="server base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--api-key")
    ap.add_argument("--soak", type=float, metavar="SECONDS", help="soak run of this length (overrides --duration)")
    ap.add_argument("--pid", type=int, help="server process id, for its RSS (needs --soak or prints at the end)")
    ap.add_argument("--rss-every", type=float, default=60.0, help="seconds between RSS lines")
    ap.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                    help="wait this long for GET /health to answer 200 before starting")
    ap.add_argument("--max-rss-growth", type=float, default=0.05,
                    help="soak: allowed relative growth of peak RSS after the first interval")
    return ap.parse_args()


def memory_kb(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of a process, in kB, from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def body_for(a, k: int) -> dict:
    prompt = prompt_for(k)
    if a.chat:
        body = completion_payload("", a.max_tokens)
        del body["prompt"]
        body["messages"] = [{"role": "user", "content": prompt}]
        return body
    return completion_payload(prompt, a.max_tokens)


async def client_loop(a, idx: int, deadline: float, client: httpx.AsyncClient, results: list):
    k = idx
    while time.perf_counter() < deadline:
        results.append(await stream_completion(client, a.url, body_for(a, k), a.api_key))
        k += a.clients


async def rss_monitor(a, start: float, deadline: float, samples: list):
    """Prints the server's memory every --rss-every seconds, and once at the end."""
    n = 1
    while True:
        wake = start + n * a.rss_every
        if wake > deadline:
            return
        await asyncio.sleep(max(0.0, wake - time.perf_counter()))
        m = memory_kb(a.pid)
        samples.append((time.perf_counter() - start, m))
        print(f"t={time.perf_counter() - start:6.0f} s  VmRSS {m['VmRSS'] / 1024:8.1f} MiB  "
              f"VmHWM {m['VmHWM'] / 1024:8.1f} MiB", flush=True)
        n += 1


async def wait_healthy(url: str, timeout: float) -> None:
    """Returns once GET /health answers 200 (a server still loading its model answers 503
    or refuses connections); exits if it does not within timeout seconds."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                if (await client.get(url + "/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"load_test: {url}/health not 200 after {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def main_async(a) -> int:
    url = a.url.rstrip("/")
    a.url = url
    duration = a.soak if a.soak else a.duration
    await wait_healthy(url, a.wait)
    limits = httpx.Limits(max_connections=a.clients + 4, max_keepalive_connections=a.clients + 4)
    results: list = []
    samples: list = []
    if a.pid:
        m = memory_kb(a.pid)
        samples.append((0.0, m))
        print(f"t=     0 s  VmRSS {m['VmRSS'] / 1024:8.1f} MiB  VmHWM {m['VmHWM'] / 1024:8.1f} MiB", flush=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration
        tasks = [client_loop(a, i, deadline, client, results) for i in range(a.clients)]
        if a.pid and a.soak:
            tasks.append(rss_monitor(a, start, deadline, samples))
        await asyncio.gather(*tasks)
        end = max([r.last for r in results if r.last] + [time.perf_counter()])
    if a.pid:
        m = memory_kb(a.pid)
        samples.append((end - start, m))
        print(f"t={end - start:6.0f} s  VmRSS {m['VmRSS'] / 1024:8.1f} MiB  VmHWM {m['VmHWM'] / 1024:8.1f} MiB (end)")

    ok = [r for r in results if not r.error]
    errors = [r for r in results if r.error]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.last - r.sent for r in ok if r.last]
    tokens = sum(r.tokens() for r in ok)
    wall = end - start
    print(f"\n{url}: {a.clients} clients, {duration:.0f} s ({wall:.1f} s until the last request ended), "
          f"{'chat' if a.chat else 'completions'}, {a.max_tokens} tokens per request")
    print(f"requests: {len(results)}  ok: {len(ok)}  errors: {len(errors)}")
    for r in errors[:5]:
        print(f"  error: {r.error}")
    short = sum(1 for r in ok if r.tokens() != a.max_tokens)
    if short:
        print(f"  note: {short} requests returned fewer than {a.max_tokens} tokens")
    print(f"TTFT ms: p50 {1000 * percentile(ttfts, 50):.1f}  p99 {1000 * percentile(ttfts, 99):.1f}  "
          f"max {1000 * max(ttfts, default=float('nan')):.1f}")
    print(f"request latency s: p50 {percentile(lat, 50):.2f}  p99 {percentile(lat, 99):.2f}")
    print(f"aggregate: {tokens} completion tokens, {tokens / wall:.1f} tokens/s, "
          f"{len(ok) / wall:.2f} requests/s")
    status = 0 if not errors and ok else 1
    if a.soak and a.pid and len(samples) >= 3:
        base = samples[1][1]["VmHWM"]  # peak after the first interval
        final = samples[-1][1]["VmHWM"]
        growth = (final - base) / base
        flat = growth <= a.max_rss_growth
        print(f"peak RSS (VmHWM): {base / 1024:.1f} MiB after {samples[1][0]:.0f} s, {final / 1024:.1f} MiB at the end: "
              f"{100 * growth:+.2f}% ({'flat' if flat else 'GROWING'}, limit {100 * a.max_rss_growth:.0f}%)")
        if not flat:
            status = 1
    return status


def main():
    a = parse_args()
    if a.soak and not a.pid:
        sys.exit("load_test: --soak needs --pid (the server's process id) to print its RSS")
    sys.exit(asyncio.run(main_async(a)))


if __name__ == "__main__":
    main()
