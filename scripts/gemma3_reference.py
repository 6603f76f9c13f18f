#!/usr/bin/env python3
"""Writes tests/fixtures/gemma3-270m-q4_k_m.json: llama.cpp's (llama-cpp-python's) token ids
and greedy continuations on the Gemma 3 270M Q4_K_M GGUF (`sparsellm fetch gemma3-270m`).

    /tmp/peer/bin/python scripts/gemma3_reference.py MODEL.gguf > tests/fixtures/gemma3-270m-q4_k_m.json

- tokenizer: the reference strings of the SmolLM2 fixture (Gemma's turn markers in place
  of ChatML's), encoded without BOS, special tokens parsed;
- licenses: every id of whole license texts (Debian's /usr/share/common-licenses, pinned by
  sha256);
- greedy: three prompts, encoded with BOS (as llama.cpp does for this vocabulary), 32
  greedy tokens, and at each step the gap between llama.cpp's two largest logits (its
  near-ties: llama.cpp computes on activations quantized to 8 bits, another engine's last
  bits differ, so a continuation may part at a step whose gap is within that noise).
"""
import hashlib
import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnewlines\n\n",
    "Numbers 12345 and 3.14159, e=mc^2.",
    'fn main() { println!("{}", 1 + 2); }',
    "Unicode: café, naïve, Straße, 東京, emoji 🚀✨",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<b>html</b> <table>   three spaces\r\n",
    "",
]
LICENSES = ["/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]

path = sys.argv[1]
vocab = Llama(model_path=path, vocab_only=True, verbose=False)
tok = lambda t: vocab.tokenize(t.encode(), add_bos=False, special=True) if t else []
out = {
    "generator": "scripts/gemma3_reference.py (llama-cpp-python, CPU, 2 threads)",
    "versions": {"llama_cpp_python": llama_cpp.__version__},
    "model_file": "gemma-3-270m-q4_k_m.gguf",
    "model_sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
    "tokenizer": [{"text": t, "ids": tok(t)} for t in TEXTS],
    "licenses": [],
    "greedy": [],
}
for f in LICENSES:
    text = open(f, "rb").read()
    out["licenses"].append({"file": f, "text_sha256": hashlib.sha256(text).hexdigest(),
                            "ids": tok(text.decode())})
m = Llama(model_path=path, n_ctx=128, n_threads=2, logits_all=True, verbose=False)
for p in PROMPTS:
    ids = m.tokenize(p.encode(), add_bos=True, special=True)
    m.reset()
    m.eval(ids)
    gen, gaps = [], []
    for _ in range(32):
        row = np.asarray(m.scores[m.n_tokens - 1], dtype=np.float64)
        top2 = np.sort(row)[-2:]
        t = int(np.argmax(row))
        gen.append(t)
        gaps.append(round(float(top2[1] - top2[0]), 4))
        m.eval([t])
    out["greedy"].append({"prompt": p, "prompt_ids": ids, "output_ids": gen, "top2_gaps": gaps})
json.dump(out, sys.stdout, ensure_ascii=False)
sys.stdout.write("\n")
