"""sparsellm.Model against the CLI and the reference fixture: the same tokens, logits,
perplexity; streaming; errors; Ctrl-C; threads."""

import concurrent.futures
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import sparsellm
from conftest import FIXTURES, REPO, cli_json

PROMPT = "The capital of France is"
EVAL_TEXT = REPO / "LICENSE-MIT"


def test_greedy_generate_gives_the_clis_tokens(model):
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "24")
    got = model.generate_detailed(PROMPT, max_tokens=24)
    assert got["prompt_ids"] == want["prompt_ids"]
    assert got["output_ids"] == want["output_ids"]
    assert got["text"] == want["text"]
    assert model.generate(PROMPT, max_tokens=24) == want["text"]
    # Token ids as the prompt give the same continuation.
    assert model.generate_detailed(want["prompt_ids"], max_tokens=24)["output_ids"] == want["output_ids"]


def test_chat_and_sampling_give_the_clis_tokens(model):
    want = cli_json("generate", "--chat", "--prompt", "Name a colour.", "--max-tokens", "20",
                    "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "7")
    got = model.generate_detailed("Name a colour.", max_tokens=20, temperature=0.8, top_k=40,
                                  top_p=0.9, seed=7, chat=True)
    assert got["prompt_ids"] == want["prompt_ids"]
    assert got["output_ids"] == want["output_ids"]
    # chat() renders the same template around the message.
    greedy = cli_json("generate", "--chat", "--prompt", "Name a colour.", "--max-tokens", "20")
    assert model.chat([{"role": "user", "content": "Name a colour."}], max_tokens=20) == greedy["text"]


def test_sparse_generate_gives_the_clis_tokens(sparse_model):
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "24", "--sparsity", "density:0.5")
    got = sparse_model.generate_detailed(PROMPT, max_tokens=24)
    assert got["output_ids"] == want["output_ids"]
    assert got["mlp_density"] == pytest.approx(want["mlp_density"])
    assert 0.4 < got["mlp_density"] < 0.6


def test_f16_kv_cache_gives_the_clis_tokens():
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "24", "--kv-dtype", "f16")
    got = sparsellm.Model(kv_dtype="f16").generate_detailed(PROMPT, max_tokens=24)
    assert got["output_ids"] == want["output_ids"]


def test_stop_strings_end_the_text_as_the_cli(model):
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "24", "--stop", "\n")
    got = model.generate_detailed(PROMPT, max_tokens=24, stop=["\n"])
    assert got["text"] == want["text"] and "\n" not in got["text"]
    assert got["stop"] == "stop"


def test_stream_concatenates_to_generate(model):
    for kwargs in ({}, {"temperature": 0.7, "seed": 3}, {"stop": ["\n\n"]}):
        pieces = list(model.stream(PROMPT, max_tokens=32, **kwargs))
        assert len(pieces) > 1
        assert "".join(pieces) == model.generate(PROMPT, max_tokens=32, **kwargs), kwargs


def test_logits_match_the_reference_fixture(f32_model):
    """As tests/reference_logits.rs: f32 weights, every top-20 logit of transformers'
    within 1e-2, the same top-1 at every position."""
    ref = json.loads((FIXTURES / "smollm2-135m-instruct-q4_1.json").read_text())
    worst, checked = 0.0, 0
    for case in ref["forward"]:
        logits = f32_model.logits(case["ids"])
        assert logits.shape == (len(case["ids"]), f32_model.vocab_size)
        assert logits.dtype == np.float32
        for row, pos in zip(logits, case["positions"]):
            assert int(row.argmax()) == pos["top_ids"][0]
            diff = np.abs(row[pos["top_ids"]] - np.asarray(pos["top_logits"], dtype=np.float32))
            worst = max(worst, float(diff.max()))
            checked += 1
    assert checked == sum(len(c["positions"]) for c in ref["forward"]) > 0
    assert worst < 1e-2, worst


def test_logits_agree_with_greedy_generation(model, sparse_model):
    # The argmax of the last row is the first greedy token, dense and sparse (where each
    # position runs token by token with its own mask, as decoding does).
    for m in (model, sparse_model):
        ids = m.tokenize(PROMPT)
        first = m.generate_detailed(ids, max_tokens=1)["output_ids"][0]
        assert int(m.logits(ids)[-1].argmax()) == first


def test_perplexity_equals_eval_json(model, sparse_model, tmp_path):
    text = EVAL_TEXT.read_text()
    want = cli_json("eval", "--text", str(EVAL_TEXT), "--window", "64")
    got = model.perplexity(text, window=64)
    assert got["windows"] >= 3
    for k in ("tokens", "tokens_unscored", "windows", "window", "dtype"):
        assert got[k] == want[k], k
    assert got["ppl_all"] == pytest.approx(want["ppl_all"], rel=1e-6)
    assert got["ppl_second_half"] == pytest.approx(want["ppl_second_half"], rel=1e-6)
    # Sparse: every position token by token with its own mask (two short windows).
    short = tmp_path / "short.txt"
    short.write_text(text[:400])
    want = cli_json("eval", "--text", str(short), "--window", "32", "--sparsity", "density:0.5")
    got = sparse_model.perplexity(short.read_text(), window=32)
    assert got["windows"] == want["windows"] >= 2
    for k in ("ppl_all", "ppl_second_half", "kl_vs_dense", "top1_agreement", "mlp_density"):
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    assert got["kl_vs_dense"] > 0
    assert got["scorer"] == want["scorer"]


def test_tokenize_and_detokenize_round_trip(model):
    ref = json.loads((FIXTURES / "smollm2-135m-instruct-q4_1.json").read_text())
    for case in ref["tokenizer"]:
        assert model.tokenize(case["text"]) == case["ids"]
        assert model.detokenize(case["ids"]) == case["text"]
    eos = model.eos_token_ids[0]
    assert model.detokenize([19556, eos], skip_special_tokens=True) == "Hello"
    assert model.tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]


def test_bench_reports_dense_and_sparse_modes(sparse_model):
    r = sparse_model.bench(prompt_tokens=16, gen_tokens=4, runs=1, warmup=0)
    assert set(r["modes"]) == {"dense", "sparse"}
    for mode in r["modes"].values():
        assert mode["decode_tok_s"]["median"] > 0
        assert mode["ttft_ms"]["min"] <= mode["ttft_ms"]["median"] <= mode["ttft_ms"]["max"]
    assert r["ratios"]["decode"] == pytest.approx(
        r["modes"]["sparse"]["decode_tok_s"]["median"] / r["modes"]["dense"]["decode_tok_s"]["median"])
    assert 0.4 < r["modes"]["sparse"]["mlp_density"] < 0.6
    assert (r["prompt_tokens"], r["gen_tokens"], r["runs"]) == (16, 4, 1)


def test_bad_files_raise_model_error(tmp_path, model):
    missing = tmp_path / "missing.gguf"
    with pytest.raises(sparsellm.ModelError, match="missing.gguf"):
        sparsellm.Model(missing)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(model.path.read_bytes()[:4096])
    with pytest.raises(sparsellm.ModelError, match="truncated.gguf"):
        sparsellm.Model(truncated)
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    with pytest.raises(sparsellm.ModelError, match="notes.gguf"):
        sparsellm.Tokenizer(not_gguf)
    with pytest.raises(sparsellm.ModelError):
        sparsellm.Model(sparsity="density:0.5", predictor=truncated)
    assert issubclass(sparsellm.ModelError, Exception) and not issubclass(sparsellm.ModelError, ValueError)


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "f64"}, "unknown dtype 'f64'"),
    ({"sparsity": "dense:0.5"}, "bad sparsity spec 'dense:0.5'"),
    ({"sparsity": "density:0"}, "density"),
    ({"sparsity": "calibrated"}, "needs a predictor"),
    ({"sparsity": "density:0.5", "scorer": "lowrank"}, "needs a predictor"),
    ({"scorer": "exact"}, "sparsity setting other than off"),
    ({"sparse_mode": "fast"}, "bad sparse mode 'fast'"),
    ({"threads": 0}, "at least 1"),
    ({"kv_dtype": "f8"}, "unknown KV cache type 'f8'"),
])
def test_bad_model_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sparsellm.Model(**kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(PROMPT, temperature=-1), "temperature"),
    (lambda m: m.generate(PROMPT, top_p=0), "top-p"),
    (lambda m: m.generate(PROMPT, max_tokens=0), "max_tokens"),
    (lambda m: m.generate(PROMPT, top_k=-1), "top_k"),
    (lambda m: m.generate(PROMPT, seed=-1), "seed"),
    (lambda m: m.generate(PROMPT, stop=[""]), "stop"),
    (lambda m: m.generate([], max_tokens=4), "empty"),
    (lambda m: m.generate([10**6]), "vocabulary"),
    (lambda m: m.generate([1, 2], chat=True), "chat"),
    (lambda m: m.stream(PROMPT, top_p=2), "top-p"),
    (lambda m: m.chat([]), "no chat messages"),
    (lambda m: m.chat([{"content": "hi"}]), "role"),
    (lambda m: m.logits([]), "token ids"),
    (lambda m: m.logits([10**6]), "vocabulary"),
    (lambda m: m.detokenize([10**6]), "vocabulary"),
    (lambda m: m.perplexity("short text", window=64), "fewer than one window"),
    (lambda m: m.perplexity("some text", window=2), "too small"),
    (lambda m: m.bench(prompt_tokens=0), "at least 1"),
])
def test_bad_call_arguments_raise_value_error(model, call, message):
    with pytest.raises(ValueError, match=message):
        call(model)


def skip_unless_ctrl_c_reaches_python():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # A shell starts background jobs with SIGINT ignored; Python then never raises
        # KeyboardInterrupt, whatever the extension does.
        pytest.skip("SIGINT is ignored in this process (started as a background job)")


def test_ctrl_c_stops_a_long_generation_within_a_token(model):
    skip_unless_ctrl_c_reaches_python()
    token_s = 1 / model.generate_detailed(PROMPT, max_tokens=16, ignore_eos=True)["decode_tok_s"]
    delay = 0.5
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        # 4000 tokens take minutes: only the interrupt can end this call early.
        model.generate(PROMPT, max_tokens=4000, ignore_eos=True)
    late = time.monotonic() - start - delay
    timer.join()
    # Within one token of the signal (plus generous slack for a loaded machine).
    assert late < 0.5 + 5 * token_s, f"returned {late:.3f} s after Ctrl-C; a token takes {token_s:.3f} s"
    # The model is usable afterwards and gives the same tokens as before.
    assert model.generate(PROMPT, max_tokens=8) == model.generate(PROMPT, max_tokens=8)


def test_ctrl_c_while_streaming_stops_the_generation(model):
    skip_unless_ctrl_c_reaches_python()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    pieces = []
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for piece in model.stream(PROMPT, max_tokens=4000, ignore_eos=True):
            pieces.append(piece)
    timer.join()
    assert pieces
    # The abandoned stream's generation stopped: the model is free at once.
    start = time.monotonic()
    model.generate(PROMPT, max_tokens=2)
    assert time.monotonic() - start < 30


def test_closing_a_stream_stops_its_generation(model):
    s = model.stream(PROMPT, max_tokens=4000, ignore_eos=True)
    first = next(s)
    assert first
    s.close()
    assert list(s) == []
    # The background generation stopped: the model is free for the next call at once
    # (4000 tokens would hold it for minutes).
    start = time.monotonic()
    model.generate(PROMPT, max_tokens=2)
    assert time.monotonic() - start < 30


def test_four_threads_on_one_model_give_the_sequential_results(model):
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Water boils at"]
    calls = [
        lambda p: model.generate_detailed(p, max_tokens=8)["output_ids"],
        lambda p: "".join(model.stream(p, max_tokens=8)),
        lambda p: model.logits(model.tokenize(p)).argmax(axis=1).tolist(),
        lambda p: model.generate_detailed(p, max_tokens=8, temperature=0.9, seed=5)["output_ids"],
    ]
    jobs = [(c, p) for c in calls for p in prompts]
    sequential = [c(p) for c, p in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        parallel = list(ex.map(lambda job: job[0](job[1]), jobs))
    assert parallel == sequential


def test_help_and_properties(model):
    assert "max_tokens" in sparsellm.Model.generate.__doc__
    assert "ModelError" in sparsellm.Model.__doc__
    assert model.dtype == "native" and model.sparsity == "off"
    assert model.context_length >= 2048 and model.vocab_size == 49152
    assert model.threads >= 1
