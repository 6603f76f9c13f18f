#!/usr/bin/env python3
"""Serving benchmark: aggregate decode tokens/s at 1, 2, 4, 8, 16 concurrent streams,
`sparsellm serve` against llama.cpp's `llama-server`, interleaved in one session.

    scripts/build-llamacpp                      # once: target/llama.cpp-build/bin/llama-server
    cargo build --release
    target/py/bin/python scripts/bench_serve.py --rounds 3      # the venv scripts/test makes

Same GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf, or $SPARSELLM_MODELS_DIR), same
--threads, same prompts (one distinct plain-English prompt per stream, /v1/completions),
greedy, and a fixed generation length (max_tokens with ignore_eos, so no stream stops early).
Ours is one `sparsellm serve --parallel MAX` for the whole run; llama-server's slots are fixed
at start, so it is restarted as `llama-server -np N` for every N. Each round measures every
N for both servers back to back (the order alternates between rounds), so drift on a shared
machine hits both alike. Every server gets one short warm-up request after it starts.

Per run of N streams, all sent at once, timed on the client from the SSE chunks:
  decode tok/s  tokens that arrived between the last stream's first token and the very last
                token, divided by that time: the steady rate once every stream is decoding
                (prefill and the wait for it excluded);
  e2e tok/s     all completion tokens / (last token - requests sent): what clients see,
                prefill and queueing included;
  TTFT p50      median time to first token over the N streams.
The table gives the median over rounds and the range (min-max). Prints markdown; --json
writes every run.
"""
import argparse
import asyncio
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_client import Server, completion_payload, free_port, percentile, prompt_for, stream_completion  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args():
    models = os.environ.get("SPARSELLM_MODELS_DIR", os.path.join(ROOT, "models"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4,8,16", help="comma-separated concurrencies")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128, help="generated tokens per stream")
    ap.add_argument("--ctx-per-stream", type=int, default=512,
                    help="context per stream: llama-server -c N*this (split over its N slots), ours --ctx-size this (per request)")
    ap.add_argument("--sparsellm", default=os.path.join(ROOT, "target/release/sparsellm"))
    ap.add_argument("--ours-args", default="", help="extra arguments for `sparsellm serve`")
    ap.add_argument("--llama-server", default=os.path.join(ROOT, "target/llama.cpp-build/bin/llama-server"))
    ap.add_argument("--theirs-args", default="", help="extra arguments for llama-server")
    ap.add_argument("--only", choices=["ours", "theirs"], help="measure one server only")
    ap.add_argument("--json", help="write every run's figures to this file")
    ap.add_argument("--log-dir", default=os.path.join(ROOT, "target/bench-serve"))
    return ap.parse_args()


async def measure(base_url: str, n: int, max_tokens: int) -> dict:
    """N concurrent greedy streams of max_tokens tokens; returns the run's figures."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        results = await asyncio.gather(*(
            stream_completion(client, base_url, completion_payload(prompt_for(i), max_tokens))
            for i in range(n)))
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} streams failed: {errors[0]}")
    short = [r.tokens() for r in results if r.tokens() != max_tokens]
    if short:
        raise RuntimeError(f"streams returned {short} tokens, not {max_tokens} (ignore_eos ignored?)")
    sent = min(r.sent for r in results)
    last_first = max(r.first for r in results)
    last = max(r.last for r in results)
    window = sum(r.tokens_between(last_first, last) for r in results)
    total = sum(r.tokens() for r in results)
    ttfts = [r.ttft for r in results]
    return {
        "streams": n,
        "decode_tps": window / (last - last_first) if last > last_first else float("nan"),
        "e2e_tps": total / (last - sent),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_max_ms": 1000 * max(ttfts),
        "wall_s": last - sent,
        "prompt_tokens": [r.prompt_tokens for r in results],
    }


def warm_up(server: Server) -> None:
    asyncio.run(measure(server.base_url, 1, 8))


def start_ours(a, max_n: int) -> Server:
    port = free_port()
    argv = [a.sparsellm, "serve", "--model", a.model, "--threads", str(a.threads),
            "--parallel", str(max_n), "--ctx-size", str(a.ctx_per_stream),
            "--host", "127.0.0.1", "--port", str(port)] + shlex.split(a.ours_args)
    s = Server("sparsellm serve", argv, port, os.path.join(a.log_dir, "ours.log"))
    s.wait_healthy()
    warm_up(s)
    return s


def start_theirs(a, n: int, round_: int) -> Server:
    port = free_port()
    argv = [a.llama_server, "-m", a.model, "-t", str(a.threads), "-tb", str(a.threads),
            "-np", str(n), "-c", str(n * a.ctx_per_stream), "--host", "127.0.0.1",
            "--port", str(port), "--no-webui"] + shlex.split(a.theirs_args)
    s = Server(f"llama-server -np {n}", argv, port, os.path.join(a.log_dir, f"llama-server-np{n}-r{round_}.log"))
    s.wait_healthy()
    warm_up(s)
    return s


def host_description() -> str:
    cpu = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else ["?"] * 3
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.machine()}, load average {' '.join(load)}"


def fmt(values: list, digits: int = 1) -> str:
    """median (min-max)"""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main():
    a = parse_args()
    os.makedirs(a.log_dir, exist_ok=True)
    streams = [int(s) for s in a.streams.split(",")]
    for path, what in ((a.model, "model"), (a.sparsellm, "sparsellm (cargo build --release)"),
                       (a.llama_server, "llama-server (scripts/build-llamacpp)")):
        if what.startswith("llama") and a.only == "ours" or what.startswith("sparsellm") and a.only == "theirs":
            continue
        if not os.path.exists(path):
            sys.exit(f"bench_serve: {what} not found: {path}")
    print(f"host: {host_description()}", file=sys.stderr)
    runs = []  # dicts with server, round, streams, figures
    ours = None if a.only == "theirs" else start_ours(a, max(streams))
    ours_idle_cpu = 0.0
    try:
        for rnd in range(a.rounds):
            for n in streams:
                order = ["ours", "theirs"] if rnd % 2 == 0 else ["theirs", "ours"]
                for who in order:
                    if a.only and who != a.only:
                        continue
                    if who == "ours":
                        r = asyncio.run(measure(ours.base_url, n, a.max_tokens))
                    else:
                        theirs = start_theirs(a, n, rnd)
                        before = ours.cpu_seconds() if ours else 0.0
                        try:
                            r = asyncio.run(measure(theirs.base_url, n, a.max_tokens))
                        finally:
                            theirs.stop()
                        ours_idle_cpu += (ours.cpu_seconds() - before) if ours else 0.0
                    r.update(server=who, round=rnd)
                    runs.append(r)
                    print(f"round {rnd + 1} {who:6s} N={n:2d}: decode {r['decode_tps']:7.1f} tok/s, "
                          f"e2e {r['e2e_tps']:7.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:7.1f} ms",
                          file=sys.stderr)
    finally:
        if ours:
            code = ours.stop()
            if code != 0:
                print(f"bench_serve: sparsellm serve exited with {code} on SIGTERM", file=sys.stderr)

    def pick(who, n, key):
        return [r[key] for r in runs if r["server"] == who and r["streams"] == n]

    print(f"\nHost: {host_description()}. Model {os.path.basename(a.model)}, --threads {a.threads}, "
          f"{a.max_tokens} greedy tokens per stream (ignore_eos), {a.rounds} interleaved rounds; "
          f"median (min-max) over rounds.\n")
    print("| streams | ours decode tok/s | llama-server decode tok/s | ours / llama-server "
          "| ours e2e tok/s | llama-server e2e tok/s | ours TTFT p50 ms | llama-server TTFT p50 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for n in streams:
        od, td = pick("ours", n, "decode_tps"), pick("theirs", n, "decode_tps")
        ratio = f"{statistics.median(od) / statistics.median(td):.2f}x" if od and td else "-"
        print(f"| {n} | {fmt(od)} | {fmt(td)} | {ratio} | {fmt(pick('ours', n, 'e2e_tps'))} "
              f"| {fmt(pick('theirs', n, 'e2e_tps'))} | {fmt(pick('ours', n, 'ttft_p50_ms'), 0)} "
              f"| {fmt(pick('theirs', n, 'ttft_p50_ms'), 0)} |")
    one = pick("ours", 1, "decode_tps")
    for n in streams:
        if n != 1 and one and pick("ours", n, "decode_tps"):
            print(f"\nours at {n} streams / ours at 1 stream (decode): "
                  f"{statistics.median(pick('ours', n, 'decode_tps')) / statistics.median(one):.2f}x", end="")
    print()
    if ours and a.only is None:
        print(f"\n(idle sparsellm serve used {ours_idle_cpu:.2f} CPU-s in total while llama-server ran)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"host": host_description(), "args": vars(a), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"(bench_serve took {time.time() - t0:.0f} s)", file=sys.stderr)
