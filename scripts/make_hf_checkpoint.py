#!/usr/bin/env python3
"""Turn a LLaMA-architecture GGUF file into a HuggingFace checkpoint directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), using only the
third-party `gguf` package (dequantization) and `safetensors`/`numpy` (writing).

Independent of the project's own loaders, so a test can load the same weights both ways.

    pip install gguf safetensors numpy
    python3 scripts/make_hf_checkpoint.py MODEL.gguf OUT_DIR [--dtype f32|f16|bf16] [--tokenizer FILE]

The tokenizer.json copied into OUT_DIR is SmolLM2's (byte-level BPE with the Digits
pre-tokenizer; default: tests/fixtures/smollm2-135m-instruct/tokenizer.json of this
repository, see tests/fixtures/README.md); it is copied when the GGUF's vocabulary size
matches it (49152).
"""
import argparse, json, os, shutil, struct
import numpy as np
import gguf
from gguf import GGUFReader
from gguf.quants import dequantize

ap = argparse.ArgumentParser()
ap.add_argument("gguf"); ap.add_argument("out")
ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
here = os.path.dirname(os.path.abspath(__file__))
ap.add_argument("--tokenizer", default=os.path.join(
    here, "..", "tests", "fixtures", "smollm2-135m-instruct", "tokenizer.json"))
a = ap.parse_args()

r = GGUFReader(a.gguf)
def field(name):
    f = r.fields[name]
    v = f.contents()
    return v
arch = field("general.architecture")
assert arch == "llama", f"only llama GGUF files are handled, got {arch}"
n_layer = int(field("llama.block_count")); hidden = int(field("llama.embedding_length"))
n_head = int(field("llama.attention.head_count")); n_kv = int(field("llama.attention.head_count_kv"))
inter = int(field("llama.feed_forward_length"))
vocab = len(field("tokenizer.ggml.tokens"))
names = {t.name for t in r.tensors}
tied = "output.weight" not in names
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": n_layer,
    "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": hidden // n_head,
    "hidden_act": "silu", "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
    "rope_theta": float(field("llama.rope.freq_base")),
    "max_position_embeddings": int(field("llama.context_length")),
    "vocab_size": vocab, "tie_word_embeddings": tied,
    "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
    "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
    "attention_bias": False, "mlp_bias": False, "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[a.dtype],
}

def unpermute(w, heads):
    # GGUF stores q/k rows interleaved for llama.cpp's RoPE; HF uses rotate-half.
    d = w.shape[0] // heads // 2
    return w.reshape(heads, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

rename = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
tensors = {}
for t in r.tensors:
    w = dequantize(t.data, t.tensor_type).astype(np.float32)
    shape = [int(x) for x in reversed(t.shape)]          # GGUF lists dims fastest-first
    w = w.reshape(shape)
    if t.name == "token_embd.weight": key = "model.embed_tokens.weight"
    elif t.name == "output_norm.weight": key = "model.norm.weight"
    elif t.name == "output.weight": key = "lm_head.weight"
    else:
        _, i, part, _ = t.name.split(".")
        key = f"model.layers.{i}.{rename[part]}.weight"
        if part == "attn_q": w = unpermute(w, n_head)
        if part == "attn_k": w = unpermute(w, n_kv)
    tensors[key] = np.ascontiguousarray(w)

os.makedirs(a.out, exist_ok=True)
path = os.path.join(a.out, "model.safetensors")
if a.dtype == "bf16":
    # safetensors' numpy API has no bfloat16: write the (simple) format by hand, rounding to nearest even.
    header, blobs, off = {}, [], 0
    for k in sorted(tensors):
        u = tensors[k].view(np.uint32)
        b = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(tensors[k].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for b in blobs: f.write(b)
else:
    from safetensors.numpy import save_file
    dt = np.float32 if a.dtype == "f32" else np.float16
    save_file({k: v.astype(dt) for k, v in tensors.items()}, path, metadata={"format": "pt"})

json.dump(config, open(os.path.join(a.out, "config.json"), "w"), indent=2)
tok = a.tokenizer
if vocab == 49152:
    if not os.path.exists(tok):
        raise SystemExit(f"{tok}: no such tokenizer.json (pass --tokenizer FILE)")
    shutil.copy(tok, os.path.join(a.out, "tokenizer.json"))
    json.dump({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
               "chat_template": field("tokenizer.chat_template")},
              open(os.path.join(a.out, "tokenizer_config.json"), "w"), indent=2)
print(f"wrote {a.out}: {len(tensors)} tensors, {a.dtype}, tied={tied}")
