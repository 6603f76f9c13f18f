"""sparsellm.transformers as a drop-in: a script written against transformers' API runs
with only its import changed and gives the CLI's greedy tokens."""

import json
import subprocess
import sys

import numpy as np
import pytest

import sparsellm.transformers as st
from conftest import REPO, cli_json

PROMPT = "The capital of France is"

# Written for HuggingFace transformers (the model path aside); the test swaps the import.
SCRIPT = '''
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer

path, prompt, tensors = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
model.eval()
inputs = tokenizer(prompt, return_tensors=tensors)
outputs = model.generate(**inputs, max_new_tokens=16, do_sample=False)
prompt_len = inputs["input_ids"].shape[1]
new_ids = outputs[0][prompt_len:]
logits = model(inputs["input_ids"]).logits
chat_ids = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is 2+2? Reply with the number only."}],
    add_generation_prompt=True, return_tensors=tensors)
chat_out = model.generate(chat_ids, max_new_tokens=32)
print(json.dumps({
    "new_ids": [int(t) for t in new_ids],
    "text": tokenizer.decode(new_ids, skip_special_tokens=True),
    "logits_shape": list(logits.shape),
    "next_id": int(logits[0, -1].argmax()),
    "chat_new_ids": [int(t) for t in chat_out[0][chat_ids.shape[1]:]],
    "eos": tokenizer.eos_token_id,
}))
'''


def run_script(tmp_path, tensors):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace("from transformers import", "from sparsellm.transformers import"))
    model = sparsellm_default_model()
    out = subprocess.run([sys.executable, str(script), model, PROMPT, tensors],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def sparsellm_default_model():
    import sparsellm

    return str(sparsellm.default_model_path())


@pytest.mark.parametrize("tensors", ["np", "pt"])
def test_a_transformers_script_gives_the_clis_greedy_tokens(tmp_path, tensors):
    if tensors == "pt":
        pytest.importorskip("torch")
    got = run_script(tmp_path, tensors)
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "16")
    assert got["new_ids"] == want["output_ids"]
    assert got["text"] == want["text"]
    assert got["logits_shape"] == [1, len(want["prompt_ids"]), 49152]
    assert got["next_id"] == want["output_ids"][0]
    chat = cli_json("generate", "--chat", "--prompt", "What is 2+2? Reply with the number only.",
                    "--max-tokens", "32")
    # transformers keeps the EOS token that ended the generation; the CLI does not print it.
    expected = chat["output_ids"] + ([got["eos"]] if chat["stop"] == "eos" else [])
    assert got["chat_new_ids"] == expected


def test_lists_numpy_and_batches():
    tok = st.AutoTokenizer.from_pretrained(sparsellm_default_model())
    model = st.AutoModelForCausalLM.from_pretrained(sparsellm_default_model())
    want = cli_json("generate", "--prompt", PROMPT, "--max-tokens", "8")["output_ids"]
    ids = tok(PROMPT)["input_ids"]
    assert isinstance(ids, list) and ids == tok.encode(PROMPT)
    out = model.generate([ids], max_new_tokens=8)
    assert isinstance(out, list) and out == [ids + want]
    arr = np.asarray([ids, ids], dtype=np.int64)
    out = model.generate(arr, max_new_tokens=8)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64
    assert out.tolist() == [ids + want] * 2
    # max_length counts the prompt, as transformers.
    assert model.generate([ids], max_length=len(ids) + 3) == [ids + want[:3]]
    logits = model([ids]).logits
    assert isinstance(logits, np.ndarray) and logits.shape == (1, len(ids), 49152)
    assert tok.batch_decode(out[:, len(ids):]) == [tok.decode(want)] * 2
    # Seeded sampling repeats.
    a = model.generate([ids], max_new_tokens=8, do_sample=True, temperature=0.9, top_k=40, seed=1)
    b = model.generate([ids], max_new_tokens=8, do_sample=True, temperature=0.9, top_k=40, seed=1)
    assert a == b


def test_unsupported_arguments_are_refused_not_ignored():
    model = st.AutoModelForCausalLM.from_pretrained(sparsellm_default_model())
    with pytest.raises(TypeError, match="num_beams"):
        model.generate([[1, 2]], max_new_tokens=2, num_beams=4)
    with pytest.raises(NotImplementedError, match="padded"):
        model.generate([[1, 2]], attention_mask=[[0, 1]], max_new_tokens=2)
    with pytest.raises(TypeError, match="load_in_8bit"):
        st.AutoModelForCausalLM.from_pretrained(sparsellm_default_model(), load_in_8bit=True)
