#!/usr/bin/env bash
# Decode at long contexts, interleaved: llama-bench (its default f16 KV cache) against
# `sparsellm bench` with the KV cache in f32 and in f16.
#
#   scripts/long_context_compare.sh [rounds]        (default 2)
#
# Environment: MODEL (default: the default model in $SPARSELLM_MODELS_DIR or ./models),
# CONTEXTS (default "1024 4096"), THREADS (default 2), GEN (tokens per run, default 32).
# Needs llama-bench, built once by `scripts/build-llamacpp llama-bench` (docs/peer.md),
# and `cargo build --release`. Prints one line per engine, context and round.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
MODEL=${MODEL:-${SPARSELLM_MODELS_DIR:-models}/SmolLM2-135M-Instruct.Q4_1.gguf}
CONTEXTS=${CONTEXTS:-1024 4096}
THREADS=${THREADS:-2}
GEN=${GEN:-32}
BENCH=target/llama.cpp-build/bin/llama-bench
[ -x "$BENCH" ] || { echo "$BENCH not found: run scripts/build-llamacpp llama-bench" >&2; exit 1; }
[ -x target/release/sparsellm ] || { echo "target/release/sparsellm not found: cargo build --release" >&2; exit 1; }
for round in $(seq "$ROUNDS"); do
  for P in $CONTEXTS; do
    t=$("$BENCH" -m "$MODEL" -t "$THREADS" -p 0 -n "$GEN" -d "$P" -r 2 -o jsonl 2>/dev/null |
      python3 -c "import json,sys; [print('%.1f' % json.loads(l)['avg_ts']) for l in sys.stdin if l.strip()]")
    echo "round $round context $P llama-bench (f16 KV) $t tok/s"
    for kv in f32 f16; do
      target/release/sparsellm bench --model "$MODEL" --prompt-tokens "$P" --gen-tokens "$GEN" \
        --runs 2 --threads "$THREADS" --kv-dtype "$kv" --json 2>/dev/null |
        python3 -c "
import json, sys
d = json.load(sys.stdin)['modes']['dense']
t = d['decode_tok_s']
print('round $round context $P sparsellm ($kv KV) %.1f [%.1f, %.1f] tok/s, peak RSS %.0f MB' % (t['median'], t['min'], t['max'], d['peak_rss_mb']))"
    done
  done
done
