"""`sparsellm serve` driven by the official `openai` Python package (PyPI), as an application
would: chat and completions, streaming and not, stop strings, usage (and
stream_options.include_usage), logprobs, seeds, and errors surfacing as openai's exception
types. Greedy requests make every comparison exact: a stream must carry the very text the
non-streaming answer has."""

import math
import time

import openai
import pytest
from server_testlib import API_KEY, Serve

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: an error must surface at once, as the server sent it.
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, **kw):
    """A greedy chat request; keyword arguments override (None drops a default)."""
    args = dict(model="any-name-is-accepted", messages=CHAT, max_tokens=12, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**{k: v for k, v in args.items() if v is not None})


def complete(client, **kw):
    """A greedy completion request; keyword arguments override (None drops a default)."""
    args = dict(model="any-name-is-accepted", prompt=PROMPT, max_tokens=12, temperature=0)
    args.update(kw)
    return client.completions.create(**{k: v for k, v in args.items() if v is not None})


def check_usage(usage, max_tokens=None):
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if max_tokens is not None:
        assert usage.completion_tokens <= max_tokens


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id
    assert models[0].object == "model"


def test_chat_non_streaming(client):
    r = chat(client)
    assert r.object == "chat.completion"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content
    assert c.finish_reason in ("stop", "length")
    check_usage(r.usage, 12)
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12


def test_chat_streaming_carries_the_same_text(client):
    whole = chat(client)
    stream = chat(client, stream=True)
    parts, finish, roles = [], None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.usage is None  # no include_usage: no usage in any chunk
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                parts.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert roles[:1] == ["assistant"]
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert len(parts) > 1, "the answer came in one chunk: not streamed token by token"


def test_max_completion_tokens_limits_chat(client):
    r = chat(client, max_tokens=None, max_completion_tokens=3,
             messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_completion_non_streaming_and_streaming(client):
    whole = complete(client)
    assert whole.object == "text_completion"
    text = whole.choices[0].text
    assert text
    check_usage(whole.usage, 12)
    parts, finish = [], None
    for chunk in complete(client, stream=True):
        for c in chunk.choices:
            parts.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(parts) == text
    assert finish == whole.choices[0].finish_reason


def test_stream_options_include_usage(client):
    whole = complete(client, max_tokens=6)
    chunks = list(complete(client, max_tokens=6, stream=True, stream_options={"include_usage": True}))
    # OpenAI's contract: every chunk has a usage field, null except in one last chunk that
    # has an empty choices list and the usage of the whole request.
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    check_usage(last.usage, 6)


def stop_string_in(text: str) -> str:
    """A short non-blank piece of text that starts after its first character."""
    for i in range(1, len(text) - 2):
        piece = text[i:i + 3]
        if piece.strip() == piece and piece:
            return piece
    pytest.skip(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_completion(client, stream):
    text = complete(client, max_tokens=16).choices[0].text
    stop = stop_string_in(text)
    expected = text[: text.index(stop)]
    if stream:
        parts, finish = [], None
        for chunk in complete(client, max_tokens=16, stop=[stop], stream=True):
            for c in chunk.choices:
                parts.append(c.text)
                finish = c.finish_reason or finish
        got = "".join(parts)
    else:
        r = complete(client, max_tokens=16, stop=stop)
        got, finish = r.choices[0].text, r.choices[0].finish_reason
    assert got == expected, f"stop {stop!r} in {text!r}"
    assert finish == "stop"


def test_stop_string_in_chat(client):
    text = chat(client, max_tokens=16).choices[0].message.content
    stop = stop_string_in(text)
    r = chat(client, max_tokens=16, stop=[stop, "never-generated-xyzzy"])
    assert r.choices[0].message.content == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_logprobs(client):
    r = chat(client, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0.0
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert sum(math.exp(x) for x in tops) <= 1.0 + 1e-4
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(tops[0], abs=1e-4)


def test_completion_logprobs(client):
    r = complete(client, max_tokens=5, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    assert "".join(lp.tokens) == r.choices[0].text
    assert all(x <= 0.0 for x in lp.token_logprobs)
    for tok, top in zip(lp.tokens, lp.top_logprobs):
        assert len(top) == 2
        assert max(top, key=top.get) == tok


def test_seeded_sampling_repeats(client):
    a = complete(client, max_tokens=10, temperature=1.0, top_p=0.95, seed=1234).choices[0].text
    b = complete(client, max_tokens=10, temperature=1.0, top_p=0.95, seed=1234).choices[0].text
    assert a == b


def test_wrong_api_key_is_authentication_error(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="m", prompt="Hi", max_tokens=2)


def test_wrong_type_is_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, temperature=None, extra_body={"temperature": "hot"})
    assert e.value.status_code == 400
    assert "temperature" in str(e.value.message)


def test_context_overflow_is_bad_request(client):
    long_prompt = "one two three four five six seven eight nine ten " * 400  # ~4000 tokens > 2048
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, prompt=long_prompt, max_tokens=4)
    assert e.value.status_code == 400
    assert "context" in str(e.value.message).lower()
    # ... and the server still answers.
    assert complete(client, max_tokens=2).usage.completion_tokens > 0


def test_full_queue_is_rate_limit_error(log_dir):
    """One sequence and no queue: while a stream runs, the next request is refused at once
    with 429, which the client raises as RateLimitError; the server serves again after."""
    s = Serve(log_dir, "--parallel", "1", "--max-queue", "0", "--threads", "1", name="queue")
    try:
        c = openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        running = c.completions.create(model="m", prompt=PROMPT, max_tokens=500, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
        next(iter(running))  # the stream holds the only sequence
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="m", prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 429
        running.close()  # the client goes away: its sequence is freed within a step
        for _ in range(100):
            try:
                assert c.completions.create(model="m", prompt=PROMPT, max_tokens=2).usage.completion_tokens > 0
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        else:
            pytest.fail("the sequence of a closed stream was not freed within 5 s")
    finally:
        assert s.stop() == 0
