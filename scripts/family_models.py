#!/usr/bin/env python3
"""Tiny random-weight checkpoints of the model families, and independent references.

    family_models.py make FAMILY OUT_DIR
        writes OUT_DIR/hf/ (config.json + model.safetensors, F32) and OUT_DIR/model.gguf
        (the same weights as llama.cpp's converter lays them out: q/k rows permuted for
        the llama architecture, Gemma's norms stored as 1 + w), with a small
        SentencePiece-style vocabulary (byte fallback, scores) in the GGUF's metadata.
    family_models.py reference HF_DIR IDS_JSON
        prints {"logits": [[...] per position]} for the ids, computed in float64 with
        numpy by a transcription of HuggingFace transformers' modeling code
        (modeling_llama / mistral / qwen2 / qwen3 / gemma3: rotate-half RoPE, repeat_kv,
        the causal and sliding-window masks, Gemma's (1 + w) norms, sandwich norms,
        scaled embeddings, GELU-tanh, query_pre_attn_scalar, final softcapping).
    family_models.py llamacpp GGUF IDS_JSON
        prints {"logits": ...} from llama.cpp (llama-cpp-python, logits_all), and
        {"tokens": ...} for TEXTS_JSON with `llamacpp-tokenize GGUF TEXTS_JSON`.

FAMILY: llama, mistral, qwen2, qwen3, gemma3. Only numpy (and gguf + safetensors for
`make`, llama_cpp for `llamacpp`) are needed.
"""
import json
import math
import os
import sys

import numpy as np

# Each family's tiny shape. Windows are shorter than the tests' sequences so that the
# sliding-window masks matter; head_dim differs from hidden/heads where the family allows.
SHAPES = {
    "llama": dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16),
    "mistral": dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16, window=5),
    "qwen2": dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=16),
    "qwen3": dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, head_dim=32),
    "gemma3": dict(hidden=64, inter=96, layers=3, heads=4, kv_heads=1, head_dim=32, window=4,
                   pattern=3),
}
VOCAB_PIECES = ["\u2581the", "\u2581a", "th", "he", "in", "er", "an", "\u2581t", "\u2581s", "on", "en",
                "\u2581o", "re", "at", "\u2581w", "is", "\u2581th", "\u2581in", "ing", "\u2581an",
                "nd", "ed", "\u2581and", "\u2581of", "or", "es", "\u2581to", "it", "ou", "\u2581is"]


def vocab():
    """A SentencePiece-style vocabulary: unk, bos, eos, 256 byte tokens, pieces."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append("<0x%02X>" % b)
        scores.append(0.0)
        types.append(6)
    for i, p in enumerate(VOCAB_PIECES):
        tokens.append(p)
        scores.append(-float(i + 1))
        types.append(1)
    for c in "abcdefghijklmnopqrstuvwxyz\u2581":
        tokens.append(c)
        scores.append(-100.0)
        types.append(1)
    return tokens, scores, types


def config(family, vocab_size):
    s = SHAPES[family]
    c = {
        "hidden_size": s["hidden"], "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
        "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": family in ("qwen3", "gemma3"),
    }
    if family == "llama":
        # Llama 3.1's RoPE scaling, with a short original context so that the test's
        # positions see all three of its regimes (kept, smoothed, divided frequencies).
        c.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif family == "mistral":
        c.update(model_type="mistral", architectures=["MistralForCausalLM"], hidden_act="silu",
                 sliding_window=s["window"])
    elif family == "qwen2":
        c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                 use_sliding_window=False, sliding_window=None)
    elif family == "qwen3":
        c.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act="silu",
                 attention_bias=False, rope_theta=1000000.0)
    elif family == "gemma3":
        n = s["layers"]
        c.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                 hidden_activation="gelu_pytorch_tanh",
                 # GGUF has no key for it: llama.cpp uses 1/sqrt(head_dim), as Gemma 3 does.
                 query_pre_attn_scalar=s["head_dim"],
                 sliding_window=s["window"], rope_theta=1000000.0, rope_local_base_freq=10000.0,
                 layer_types=["full_attention" if (i + 1) % s["pattern"] == 0 else "sliding_attention"
                              for i in range(n)],
                 final_logit_softcapping=30.0, attn_logit_softcapping=None,
                 # As Gemma 3 4B and larger: linear scaling on the global layers only.
                 rope_scaling={"rope_type": "linear", "factor": 8.0})
    return c


def weights(family, c, seed):
    rng = np.random.default_rng(seed)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n):
        # Around 1 for plain norms; around 0 for Gemma's (1 + w).
        base = 0.0 if family == "gemma3" else 1.0
        return (base + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": (rng.standard_normal((c["vocab_size"], h))).astype(np.float32)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        t[p + "self_attn.q_proj.weight"] = mat(q, h)
        t[p + "self_attn.k_proj.weight"] = mat(kv, h)
        t[p + "self_attn.v_proj.weight"] = mat(kv, h)
        t[p + "self_attn.o_proj.weight"] = mat(h, q)
        t[p + "mlp.gate_proj.weight"] = mat(i, h)
        t[p + "mlp.up_proj.weight"] = mat(i, h)
        t[p + "mlp.down_proj.weight"] = mat(h, i)
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        if family == "qwen2":
            for n, w in (("q", q), ("k", kv), ("v", kv)):
                t[p + f"self_attn.{n}_proj.bias"] = (0.5 * rng.standard_normal(w)).astype(np.float32)
        if family in ("qwen3", "gemma3"):
            t[p + "self_attn.q_norm.weight"] = norm(d)
            t[p + "self_attn.k_norm.weight"] = norm(d)
        if family == "gemma3":
            t[p + "pre_feedforward_layernorm.weight"] = norm(h)
            t[p + "post_feedforward_layernorm.weight"] = norm(h)
    t["model.norm.weight"] = norm(h)
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = mat(c["vocab_size"], h)
    return t


def permute(w, heads):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotate-half -> interleaved pairs.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make(family, out):
    import gguf
    from safetensors.numpy import save_file

    tokens, scores, types = vocab()
    c = config(family, len(tokens))
    t = weights(family, c, seed=sum(map(ord, family)))
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    with open(os.path.join(out, "hf", "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    save_file(t, os.path.join(out, "hf", "model.safetensors"))

    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3": "gemma3"}[family]
    w = gguf.GGUFWriter(os.path.join(out, f"model.gguf.tmp{os.getpid()}"), arch)
    w.add_name(f"tiny-{family}")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_file_type(0)
    if family == "llama":
        # convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: llama3 scaling as one
        # factor per frequency.
        sc, hd = c["rope_scaling"], c["head_dim"]
        old = sc["original_max_position_embeddings"]
        low_wl, high_wl = old / sc["low_freq_factor"], old / sc["high_freq_factor"]
        freqs = 1.0 / (c["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wl:
                factors.append(1.0)
            elif wavelen > low_wl:
                factors.append(sc["factor"])
            else:
                smooth = (old / wavelen - sc["low_freq_factor"]) / (sc["high_freq_factor"] - sc["low_freq_factor"])
                factors.append(1 / ((1 - smooth) / sc["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    if family == "gemma3":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c["rope_scaling"]["factor"])
        w.add_sliding_window(c["sliding_window"])
        w.add_uint32("gemma3.attention.sliding_window_pattern", SHAPES["gemma3"]["pattern"])
        w.add_float32("gemma3.rope.freq_base_swa", c["rope_local_base_freq"])
        w.add_float32("gemma3.final_logit_softcapping", c["final_logit_softcapping"])
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(family != "gemma3")

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "post_attention_layernorm": "post_attention_norm" if family == "gemma3" else "ffn_norm"}
    for name, x in t.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            l, rest = name[len("model.layers."):].split(".", 1)
            part, kind = rest.rsplit(".", 1)
            g = f"blk.{l}.{names[part]}.{kind}"
            if arch == "llama" and part == "self_attn.q_proj":
                x = permute(x, c["num_attention_heads"])
            if arch == "llama" and part == "self_attn.k_proj":
                x = permute(x, c["num_key_value_heads"])
        if family == "gemma3" and name.endswith("norm.weight"):
            x = x + np.float32(1.0)
        w.add_tensor(g, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(os.path.join(out, f"model.gguf.tmp{os.getpid()}"), os.path.join(out, "model.gguf"))


def load_hf(d):
    from safetensors.numpy import load_file
    with open(os.path.join(d, "config.json")) as f:
        c = json.load(f)
    return c, {k: v.astype(np.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}


def reference(d, ids):
    """transformers' forward, transcribed (float64)."""
    c, t = load_hf(d)
    gemma = c["model_type"] == "gemma3_text"
    n, h = len(ids), c["hidden_size"]
    heads, kvh, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    eps = c["rms_norm_eps"]

    def rmsnorm(x, w):
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
        return y * (1.0 + w) if gemma else y * w

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return np.concatenate([-x2, x1], axis=-1)

    def rope(x, base, scaling):
        inv = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
        kind = (scaling or {}).get("rope_type")
        if kind == "linear":
            inv = inv / scaling["factor"]
        elif kind == "llama3":
            # transformers' _compute_llama3_parameters.
            old = scaling["original_max_position_embeddings"]
            lo, hi, f = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / f, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / f + smooth * scaled
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            inv = np.where(medium, smoothed, scaled)
        freqs = np.outer(np.arange(n, dtype=np.float64), inv)
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
        return x * cos + rotate_half(x) * sin

    def act(x):
        if gemma:
            return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
        return x / (1.0 + np.exp(-x))

    if c["model_type"] == "gemma3_text":
        types = c["layer_types"]
    elif c["model_type"] == "mistral" and c.get("sliding_window"):
        types = ["sliding_attention"] * c["num_hidden_layers"]
    else:
        types = ["full_attention"] * c["num_hidden_layers"]
    scaling = c["query_pre_attn_scalar"] ** -0.5 if gemma else hd ** -0.5

    x = t["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * np.float64(np.float32(h ** 0.5))
    qi, ki = np.arange(n)[:, None], np.arange(n)[None, :]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        sliding = types[l] == "sliding_attention"
        mask = ki <= qi
        if sliding:
            mask = mask & (qi - ki < c["sliding_window"])
        r = x
        y = rmsnorm(x, t[p + "input_layernorm.weight"])

        def proj(name):
            out = y @ t[p + f"self_attn.{name}_proj.weight"].T
            if p + f"self_attn.{name}_proj.bias" in t:
                out = out + t[p + f"self_attn.{name}_proj.bias"]
            return out
        q = proj("q").reshape(n, heads, hd)
        k = proj("k").reshape(n, kvh, hd)
        v = proj("v").reshape(n, kvh, hd)
        if p + "self_attn.q_norm.weight" in t:
            q = rmsnorm(q, t[p + "self_attn.q_norm.weight"])
            k = rmsnorm(k, t[p + "self_attn.k_norm.weight"])
        base = c["rope_local_base_freq"] if gemma and sliding else c["rope_theta"]
        # Gemma 3 scales the global layers' frequencies only.
        rope_scaling = None if gemma and sliding else c.get("rope_scaling")
        q, k = rope(q, base, rope_scaling), rope(k, base, rope_scaling)
        k = np.repeat(k, heads // kvh, axis=1)
        v = np.repeat(v, heads // kvh, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) * scaling
        s = np.where(mask[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = np.einsum("hqk,khd->qhd", s, v).reshape(n, heads * hd)
        a = a @ t[p + "self_attn.o_proj.weight"].T
        if gemma:
            a = rmsnorm(a, t[p + "post_attention_layernorm.weight"])
            x = r + a
            y = rmsnorm(x, t[p + "pre_feedforward_layernorm.weight"])
        else:
            x = r + a
            y = rmsnorm(x, t[p + "post_attention_layernorm.weight"])
        m = (act(y @ t[p + "mlp.gate_proj.weight"].T) * (y @ t[p + "mlp.up_proj.weight"].T))
        m = m @ t[p + "mlp.down_proj.weight"].T
        if gemma:
            m = rmsnorm(m, t[p + "post_feedforward_layernorm.weight"])
        x = x + m
    x = rmsnorm(x, t["model.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    logits = x @ head.T
    cap = c.get("final_logit_softcapping")
    if cap:
        logits = np.tanh(logits / cap) * cap
    return logits


def llamacpp(path, ids):
    from llama_cpp import Llama
    m = Llama(model_path=path, logits_all=True, n_ctx=max(64, len(ids) + 8), n_threads=2,
              n_batch=512, verbose=False)
    m.eval(ids)
    return np.array(m.scores[: len(ids)], dtype=np.float64)


def main():
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3])
    elif cmd in ("reference", "llamacpp"):
        with open(sys.argv[3]) as f:
            ids = json.load(f)
        fn = reference if cmd == "reference" else llamacpp
        json.dump({"logits": fn(sys.argv[2], ids).tolist()}, sys.stdout)
    elif cmd == "llamacpp-tokenize":
        from llama_cpp import Llama
        m = Llama(model_path=sys.argv[2], vocab_only=True, verbose=False)
        with open(sys.argv[3]) as f:
            texts = json.load(f)
        json.dump({"tokens": [m.tokenize(t.encode(), add_bos=False, special=True) for t in texts]},
                  sys.stdout)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
