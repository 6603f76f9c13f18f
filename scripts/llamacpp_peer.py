#!/usr/bin/env python3
"""Side-by-side peer: times llama.cpp (through the llama-cpp-python package) on a GGUF file,
the same way `sparsellm bench` should time itself, so the two can run in one session.

    # build llama-cpp-python into /tmp/peer first: docs/peer.md gives the exact command
    /tmp/peer/bin/python scripts/llamacpp_peer.py MODEL.gguf --threads 2 --prompt-tokens 128 --gen-tokens 64 --runs 5
    /tmp/peer/bin/python scripts/llamacpp_peer.py MODEL.gguf --convert bf16 OUT.gguf            # or f32 / f16
    /tmp/peer/bin/python scripts/llamacpp_peer.py MODEL.gguf --threads 2 --busy-core            # idle and loaded

With --busy-core every repetition runs twice, idle and with a busy loop pinned to the last
CPU (`taskset`, as examples/decode_under_load.rs does for sparsellm), and the figures are
reported per load ("idle", "one core busy").

Prints one JSON object: medians (and min/max) of time to first token, prefill tokens/s and
decode tokens/s (greedy, fixed lengths, no early stop). Prompt tokens are a fixed slice of
a plain-English text so that every engine sees the same ids.
"""
import argparse, json, statistics, sys, time
import llama_cpp
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--convert", nargs=2, metavar=("DTYPE", "OUT"))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--gen-tokens", type=int, default=64)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
ap.add_argument("--busy-core", action="store_true",
                help="also measure with a busy loop pinned to the last CPU, interleaved")
a = ap.parse_args()

if a.convert:
    ftype = {"f32": 0, "f16": 1, "bf16": 32}[a.convert[0]]
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype; p.allow_requantize = True; p.nthread = a.threads
    rc = llama_cpp.llama_model_quantize(a.model.encode(), a.convert[1].encode(), p)
    sys.exit(rc)

llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
            n_ctx=a.prompt_tokens + a.gen_tokens + 8, n_batch=512, verbose=False, seed=0)
ids = llm.tokenize(open(a.text, encoding="utf-8").read().encode(), add_bos=False, special=False)
prompt = ids[:a.prompt_tokens]

def one_run():
    llm.reset()
    t0 = time.perf_counter()
    n, t_first = 0, None
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        n += 1
        if t_first is None:
            t_first = time.perf_counter()
        if n >= a.gen_tokens:
            break
    t1 = time.perf_counter()
    return {"ttft_ms": (t_first - t0) * 1e3,
            "prefill_tok_s": len(prompt) / (t_first - t0),
            "decode_tok_s": (n - 1) / (t1 - t_first)}

def hog():
    import os, subprocess
    last = os.cpu_count() - 1
    return subprocess.Popen(["taskset", "-c", str(last), "sh", "-c", "while :; do :; done"])

def summary(runs):
    out = {}
    for k in runs[0]:
        v = [r[k] for r in runs]
        out[k] = statistics.median(v); out[k + "_min"] = min(v); out[k + "_max"] = max(v)
    return out

one_run()  # warm-up
loads = ["idle", "one core busy"] if a.busy_core else ["idle"]
runs = {load: [] for load in loads}
for _ in range(a.runs):
    for load in loads:
        h = hog() if load != "idle" else None
        try:
            runs[load].append(one_run())
        finally:
            if h:
                h.kill(); h.wait()
out = {"engine": "llama.cpp via llama-cpp-python " + llama_cpp.__version__, "model": a.model,
       "threads": a.threads, "prompt_tokens": len(prompt), "gen_tokens": a.gen_tokens, "runs": a.runs}
if a.busy_core:
    out["loads"] = {load: summary(r) for load, r in runs.items()}
else:
    out.update(summary(runs["idle"]))
print(json.dumps(out))
