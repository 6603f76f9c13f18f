#!/usr/bin/env bash
# Side-by-side decode/prefill of sparsellm and llama.cpp (llama-cpp-python) on the same
# weights, dtype and threads, interleaved (these machines drift 2x between minutes).
#
#   build the peer once as docs/peer.md says (llama-cpp-python in the venv /tmp/peer), then
#   scripts/peer_compare.sh [ROUNDS]        # prints one markdown row per configuration
#   DTYPES="native" scripts/peer_compare.sh # only some dtypes (native = the Q4_1 file)
#   MODEL=models/gemma-3-270m-q4_k_m.gguf DTYPES=native THREADS=2 scripts/peer_compare.sh 3
#                                           # another GGUF file, as stored, at 2 threads
#
# llama.cpp's prefill figure from llamacpp_peer.py includes Python overhead (about half
# of llama-bench's pp128, per docs/peer.md); decode figures are comparable.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
PY=${PEER_PYTHON:-/tmp/peer/bin/python}
PEER=scripts/llamacpp_peer.py
BIN=target/release/sparsellm
cargo build --release --quiet
MODEL=${MODEL:-$($BIN fetch)}
DTYPES=${DTYPES:-native f32 bf16}
# llama.cpp's copy of MODEL converted to a float dtype.
converted() { echo "/tmp/$(basename "$MODEL" .gguf)-$1.gguf"; }
for dt in $DTYPES; do
  [ "$dt" = native ] && continue
  [ -f "$(converted $dt)" ] || $PY $PEER "$MODEL" --convert $dt "$(converted $dt)" >/dev/null 2>&1
done
echo "| dtype | threads | sparsellm decode tok/s | llama.cpp decode tok/s | ratio | sparsellm prefill tok/s | llama.cpp prefill tok/s (python) |"
echo "|---|---|---|---|---|---|---|"
# native: the file as stored for both engines (ours computes on its blocks).
for dt in $DTYPES; do
  if [ "$dt" = native ]; then PEER_MODEL=$MODEL; else PEER_MODEL=$(converted $dt); fi
  for t in ${THREADS:-1 2}; do
    ours_d=(); ours_p=(); peer_d=(); peer_p=()
    for r in $(seq "$ROUNDS"); do
      j=$($PY $PEER "$PEER_MODEL" --threads $t --runs 3 2>/dev/null)
      peer_d+=($(echo "$j" | python3 -c 'import json,sys;print(json.load(sys.stdin)["decode_tok_s"])'))
      peer_p+=($(echo "$j" | python3 -c 'import json,sys;print(json.load(sys.stdin)["prefill_tok_s"])'))
      j=$($BIN bench --model "$MODEL" --dtype $dt --threads $t --runs 3 --json 2>/dev/null)
      ours_d+=($(echo "$j" | python3 -c 'import json,sys;print(json.load(sys.stdin)["modes"]["dense"]["decode_tok_s"]["median"])'))
      ours_p+=($(echo "$j" | python3 -c 'import json,sys;print(json.load(sys.stdin)["modes"]["dense"]["prefill_tok_s"]["median"])'))
    done
    python3 - "$dt" "$t" "${ours_d[*]}" "${peer_d[*]}" "${ours_p[*]}" "${peer_p[*]}" <<'PY'
import statistics as st, sys
dt, t, od, pd, op, pp = sys.argv[1:]
f = lambda s: [float(x) for x in s.split()]
od, pd, op, pp = map(f, (od, pd, op, pp))
m = st.median
print(f"| {dt} | {t} | {m(od):.1f} [{min(od):.1f}, {max(od):.1f}] | {m(pd):.1f} [{min(pd):.1f}, {max(pd):.1f}] | {m(od)/m(pd):.2f} | {m(op):.0f} | {m(pp):.0f} |")
PY
  done
done
