#!/usr/bin/env python3
"""llama.cpp's perplexity of a text on a GGUF file (through llama-cpp-python), windowed as
`sparsellm eval` windows it (src/eval.rs), so the two figures compare like with like:

- the text's tokens without BOS (with --bos: after BOS, and every window's first token
  replaced by BOS, as llama-perplexity and `sparsellm eval` do for a vocabulary whose
  add_bos_token is set, e.g. Gemma), non-overlapping windows of --window tokens from the
  start, each scored alone (fresh context), the tokens after the last whole window unscored;
- ppl_all: exp(mean NLL) of every prediction in each window (positions 0..w-2 predicting
  1..w-1); ppl_second_half: only positions w/2..w-2 (llama.cpp's own perplexity method).

    /tmp/peer/bin/python scripts/llamacpp_ppl.py MODEL.gguf [--text FILE] [--window 512] [--threads 2] [--kv f16|f32]

llama.cpp keeps its KV cache in f16 by default; sparsellm's is f32 (`--kv f32` makes
llama.cpp's the same, to separate that rounding from the rest).

Prints one JSON object with the keys of `sparsellm eval --json` that it shares.
"""
import argparse, json, math
import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
ap.add_argument("--window", type=int, default=512)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--bos", action="store_true", help="windows start with BOS (Gemma)")
ap.add_argument("--kv", choices=["f16", "f32"], default="f16",
                help="llama.cpp's KV cache type (its default f16)")
a = ap.parse_args()

w = a.window
llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=w,
            n_batch=w, n_ubatch=w, logits_all=True, verbose=False, seed=0,
            type_k={"f16": 1, "f32": 0}[a.kv], type_v={"f16": 1, "f32": 0}[a.kv])
ids = llm.tokenize(open(a.text, encoding="utf-8").read().encode(), add_bos=a.bos, special=False)
if a.bos:
    for k in range(0, len(ids), w):
        ids[k] = llm.token_bos()
windows = len(ids) // w
nll_all = nll_half = 0.0
n_all = n_half = 0
for k in range(windows):
    chunk = ids[k * w:(k + 1) * w]
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[:w], dtype=np.float64)
    m = logits.max(axis=1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
    for i in range(w - 1):
        nll = logz[i] - logits[i, chunk[i + 1]]
        nll_all += nll
        n_all += 1
        if i >= w // 2:
            nll_half += nll
            n_half += 1
print(json.dumps({"engine": "llama.cpp", "model": a.model, "window": w, "windows": windows,
                  "tokens": windows * w, "tokens_unscored": len(ids) - windows * w,
                  "ppl_all": math.exp(nll_all / n_all),
                  "ppl_second_half": math.exp(nll_half / n_half)}))
