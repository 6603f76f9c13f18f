//! The server over real HTTP (in-process servers on 127.0.0.1:0, a blocking client): the
//! OpenAI shapes, streaming against non-streaming, stop strings, concurrency that never
//! changes a greedy result, and every failure answered with the right status and an
//! OpenAI error body while the server keeps serving.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sparsellm::loader::fetch::{self, FetchOptions};
use sparsellm::model::WeightLayout;
use sparsellm::session::LoadedModel;
use sparsellm::tensor::LoadDType;
use sparsellm_server::{ServerHandle, ServerOptions};

fn load_model() -> LoadedModel {
    let opts = FetchOptions {
        models_dir: common::models_dir(),
        ..FetchOptions::from_env()
    };
    let path = fetch::fetch(&fetch::DEFAULT_MODEL, &opts).expect("the default model");
    LoadedModel::load(Some(&path), LoadDType::Native, None, WeightLayout::RowMajor)
        .expect("load the default model")
}

fn start(configure: impl FnOnce(&mut ServerOptions)) -> ServerHandle {
    let mut o = ServerOptions::new(load_model());
    o.port = 0;
    o.ctx_size = Some(512);
    configure(&mut o);
    sparsellm_server::spawn(o).expect("start the server")
}

/// The server most tests share: 8 sequences, room for 24 requests.
fn shared() -> &'static str {
    static SERVER: OnceLock<(ServerHandle, String)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let s = start(|o| {
                o.parallel = 8;
                o.max_queue = 16;
            });
            let url = s.url();
            (s, url)
        })
        .1
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        // A proxy in the environment must not intercept loopback requests.
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

/// POSTs `body` (bytes, as is) with `headers`; the status and the body text.
fn post_raw(url: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = agent().post(url).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.send(body).expect("POST");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().expect("body"))
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_raw(url, body.to_string().as_bytes(), &[]);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}"));
    (status, v)
}

fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = agent().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut r = req.call().expect("GET");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().expect("body"))
}

/// A 200 response's JSON.
fn ok(url: &str, body: &Value) -> Value {
    let (status, v) = post(url, body);
    assert_eq!(status, 200, "{v}");
    v
}

/// POSTs a streaming request; the SSE body, once the answer is a 200 event stream.
fn open_sse(url: &str, body: &Value) -> impl BufRead {
    let r = agent()
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    assert_eq!(ct.as_deref(), Some("text/event-stream"));
    BufReader::new(r.into_body().into_reader())
}

/// The `data:` payloads of an SSE response, in order.
fn stream(url: &str, body: &Value) -> Vec<String> {
    let reader = open_sse(url, body);
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read the stream");
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_owned());
        } else {
            assert!(line.is_empty(), "not SSE: {line:?}");
        }
    }
    out
}

/// Sends only the headers of a POST announcing a body of `len` bytes; the status and
/// body of the answer (HTTP/1.1 by hand: a client that sends the body would find the
/// connection closed under it).
fn announce_body(base: &str, len: usize) -> (u16, String) {
    use std::io::Write;
    let addr = base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut c, &mut reply).unwrap();
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{reply:?}"));
    let body = reply.split_once("\r\n\r\n").map_or("", |x| x.1);
    (status, body.to_owned())
}

/// Asserts an OpenAI error body and returns its error object.
fn error_object(status: u16, want: u16, body: &str) -> Value {
    assert_eq!(status, want, "{body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

/// The value of an unlabelled metric (or of the first sample whose line starts so).
fn metric(base: &str, name: &str) -> f64 {
    let (status, text) = get(&format!("{base}/metrics"), &[]);
    assert_eq!(status, 200);
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in\n{text}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "anything",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn concurrent_greedy_requests_each_give_what_they_give_alone() {
    let base = shared();
    let url = format!("{base}/v1/chat/completions");
    // Different prompts and lengths; two are longer than a prefill chunk (64 tokens).
    let long = "Here is a list of the planets of the solar system with a short note on each one, \
                from the closest to the sun to the farthest, written for a school project. "
        .repeat(2);
    let prompts: Vec<String> = vec![
        "What is the capital of France?".into(),
        "Write a haiku about the sea.".into(),
        "List three prime numbers.".into(),
        format!("{long} Start with Mercury."),
        "Explain what a CPU cache is in one sentence.".into(),
        "Translate 'good morning' into Spanish.".into(),
        format!("{long} {long} Which planet is largest?"),
        "Count from one to ten in words.".into(),
    ];
    let body = |p: &str| {
        chat(
            p,
            json!({"max_tokens": 24, "ignore_eos": true, "logprobs": true, "top_logprobs": 2}),
        )
    };
    // What each request gives alone, then all eight at once.
    let alone: Vec<Value> = prompts.iter().map(|p| ok(&url, &body(p))).collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let (url, b) = (url.clone(), body(p));
                s.spawn(move || ok(&url, &b))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let tokens = |v: &Value| -> Vec<(String, f64)> {
            v["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap().to_owned(),
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect()
        };
        assert_eq!(tokens(a).len(), 24, "prompt {i}: {a}");
        // The same tokens with the same log-probabilities: the logits are the same.
        assert_eq!(tokens(a), tokens(t), "prompt {i}");
        assert_eq!(
            a["choices"][0]["message"], t["choices"][0]["message"],
            "prompt {i}"
        );
        assert_eq!(a["usage"], t["usage"], "prompt {i}");
        assert_eq!(a["usage"]["completion_tokens"], 24);
        assert_eq!(a["choices"][0]["finish_reason"], "length");
    }
    // The prompts were tokenized differently (the long ones are longer).
    assert!(
        alone[6]["usage"]["prompt_tokens"].as_u64() > alone[0]["usage"]["prompt_tokens"].as_u64()
    );
    // Some decode steps ran several sequences together.
    let count = metric(base, "sparsellm_decode_batch_size_count");
    let ones = metric(base, "sparsellm_decode_batch_size_bucket{le=\"1\"}");
    assert!(
        count > ones,
        "no batched step: {count} steps, {ones} of one sequence"
    );
}

#[test]
fn streams_carry_the_same_text_as_whole_responses() {
    let base = shared();
    let url = format!("{base}/v1/chat/completions");
    let req = chat("Tell me about cats.", json!({"max_tokens": 20}));
    let whole = ok(&url, &req);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let data = stream(&url, &sreq);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{d}: {e}")))
        .collect();
    assert!(chunks.len() >= 4, "{data:?}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        assert!(
            c.get("usage").is_some(),
            "include_usage: every chunk has usage"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], whole["usage"]);
    let body = &chunks[..chunks.len() - 1];
    let text: String = body
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let last = body.last().unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
    assert!(
        body[..body.len() - 1]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null() && c["usage"].is_null())
    );

    // Completions: the same, without include_usage (no usage field in chunks).
    let url = format!("{base}/v1/completions");
    let req = json!({"prompt": "The history of the bicycle", "max_tokens": 16, "temperature": 0});
    let whole = ok(&url, &req);
    assert_eq!(whole["object"], "text_completion");
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let data = stream(&url, &sreq);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(whole["usage"]["completion_tokens"], 16);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[test]
fn stop_strings_cut_the_text_and_finish_with_stop() {
    let base = shared();
    let url = format!("{base}/v1/completions");
    let req = json!({"prompt": ["Once upon a time"], "max_tokens": 40, "temperature": 0,
                     "ignore_eos": true});
    let full = ok(&url, &req)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_owned();
    // A stop string from the middle of the greedy text: the text ends just before it.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 6, "{full:?}");
    let stop = format!(" {}", words[4]);
    let cut = &full[..full.find(&stop).unwrap()];
    for stream_it in [false, true] {
        let mut r = req.clone();
        r["stop"] = json!([stop.clone(), "never appears %%%"]);
        let (text, finish) = if stream_it {
            r["stream"] = json!(true);
            let data = stream(&url, &r);
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            let text: String = chunks
                .iter()
                .map(|c| c["choices"][0]["text"].as_str().unwrap())
                .collect();
            (
                text,
                chunks.last().unwrap()["choices"][0]["finish_reason"].clone(),
            )
        } else {
            let v = ok(&url, &r);
            (
                v["choices"][0]["text"].as_str().unwrap().to_owned(),
                v["choices"][0]["finish_reason"].clone(),
            )
        };
        assert_eq!(text, cut, "stream {stream_it}");
        assert_eq!(finish, "stop", "stream {stream_it}");
    }
    // A single string works too.
    let mut r = req.clone();
    r["stop"] = json!(stop);
    assert_eq!(ok(&url, &r)["choices"][0]["text"], cut);
}

#[test]
fn logprobs_are_a_log_softmax_and_penalties_apply() {
    let base = shared();
    let url = format!("{base}/v1/chat/completions");
    let v = ok(
        &url,
        &chat(
            "Name a colour.",
            json!({"max_tokens": 6, "logprobs": true, "top_logprobs": 3}),
        ),
    );
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-6);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t["token"], top[0]["token"]);
        assert_eq!(t["logprob"], top[0]["logprob"]);
    }
    // A large frequency penalty changes a greedy text that repeats itself.
    let url = format!("{base}/v1/completions");
    let req = json!({"prompt": "one two one two one two one two", "max_tokens": 12,
                     "temperature": 0, "ignore_eos": true});
    let plain = ok(&url, &req)["choices"][0]["text"].clone();
    let mut p = req.clone();
    p["frequency_penalty"] = json!(2.0);
    p["presence_penalty"] = json!(2.0);
    let penalized = ok(&url, &p)["choices"][0]["text"].clone();
    assert_ne!(plain, penalized);
    // The same seed gives the same sampled text.
    let mut s = req.clone();
    s["temperature"] = json!(1.0);
    s["seed"] = json!(1234);
    assert_eq!(
        ok(&url, &s)["choices"][0]["text"],
        ok(&url, &s)["choices"][0]["text"]
    );
}

#[test]
fn models_health_and_metrics() {
    let base = shared();
    let (status, body) = get(&format!("{base}/v1/models"), &[]);
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(get(&format!("{base}/health"), &[]).0, 200);
    ok(
        &format!("{base}/v1/completions"),
        &json!({"prompt": "Hi", "max_tokens": 2}),
    );
    let (status, text) = get(&format!("{base}/metrics"), &[]);
    assert_eq!(status, 200);
    for name in [
        "sparsellm_requests_total{endpoint=\"completions\",status=\"200\"}",
        "sparsellm_prompt_tokens_total",
        "sparsellm_completion_tokens_total",
        "sparsellm_queue_depth",
        "sparsellm_active_sequences",
        "sparsellm_time_to_first_token_seconds_bucket",
        "sparsellm_time_per_output_token_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    // Dense: no density gauge.
    assert!(!text.contains("sparsellm_mlp_density"));
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let base = shared();
    let chat_url = format!("{base}/v1/chat/completions");
    let (s, b) = post_raw(&chat_url, b"{\"messages\": [", &[]);
    assert_eq!(error_object(s, 400, &b)["code"], "invalid_json");
    let (s, b) = post_raw(
        &chat_url,
        br#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "warm"}"#,
        &[],
    );
    let e = error_object(s, 400, &b);
    assert_eq!(e["param"], "temperature");
    assert!(e["message"].as_str().unwrap().contains("temperature"));
    let (s, b) = post_raw(
        &chat_url,
        br#"{"messages": [{"role": "user", "content": 5}]}"#,
        &[],
    );
    assert_eq!(error_object(s, 400, &b)["param"], "messages[0].content");
    let (s, b) = post_raw(&chat_url, br#"{"model": "x"}"#, &[]);
    assert!(
        error_object(s, 400, &b)["message"]
            .as_str()
            .unwrap()
            .contains("messages")
    );
    let (s, v) = post(&chat_url, &chat("hi", json!({"n": 2})));
    assert_eq!(error_object(s, 400, &v.to_string())["param"], "n");
    let (s, v) = post(&chat_url, &chat("hi", json!({"top_p": 0})));
    assert_eq!(error_object(s, 400, &v.to_string())["param"], "top_p");
    // Context: the prompt plus max_tokens must fit --ctx-size (512 here).
    let (s, v) = post(&chat_url, &chat("hi", json!({"max_tokens": 600})));
    assert_eq!(
        error_object(s, 400, &v.to_string())["code"],
        "context_length_exceeded"
    );
    let huge = "word ".repeat(700);
    let (s, v) = post(&format!("{base}/v1/completions"), &json!({"prompt": huge}));
    let e = error_object(s, 400, &v.to_string());
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "prompt");
    assert!(e["message"].as_str().unwrap().contains("512"), "{e}");
    // A body over the 4 MiB cap: refused on its Content-Length, before it is sent.
    let (s, b) = announce_body(base, 5 << 20);
    assert_eq!(error_object(s, 413, &b)["code"], "request_too_large");
    // One just under it is read (and is bad JSON).
    let (s, b) = post_raw(
        &format!("{base}/v1/completions"),
        &vec![b'x'; (4 << 20) - 1],
        &[],
    );
    assert_eq!(error_object(s, 400, &b)["code"], "invalid_json");
    // Unknown paths and methods.
    let (s, b) = get(&format!("{base}/v1/nothing"), &[]);
    error_object(s, 404, &b);
    let (s, b) = get(&chat_url, &[]);
    error_object(s, 405, &b);
    // Unknown fields are ignored; the server still answers. max_completion_tokens wins
    // over max_tokens.
    let v = ok(
        &chat_url,
        &chat(
            "Say yes.",
            json!({"max_tokens": 9, "max_completion_tokens": 3, "ignore_eos": true,
                   "user": "u1", "tools": []}),
        ),
    );
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[test]
fn the_api_key_guards_everything_but_health() {
    let server = start(|o| {
        o.parallel = 1;
        o.api_key = Some("sk-test-123".into());
    });
    let base = server.url();
    assert_eq!(get(&format!("{base}/health"), &[]).0, 200);
    for path in ["/v1/models", "/metrics"] {
        let (s, b) = get(&format!("{base}{path}"), &[]);
        assert_eq!(error_object(s, 401, &b)["code"], "invalid_api_key");
        let (s, b) = get(
            &format!("{base}{path}"),
            &[("authorization", "Bearer sk-test-12")],
        );
        error_object(s, 401, &b);
        let (s, _) = get(
            &format!("{base}{path}"),
            &[("authorization", "Bearer sk-test-123")],
        );
        assert_eq!(s, 200, "{path}");
    }
    let body = chat("hi", json!({"max_tokens": 2})).to_string();
    let url = format!("{base}/v1/chat/completions");
    let (s, b) = post_raw(&url, body.as_bytes(), &[]);
    error_object(s, 401, &b);
    let (s, b) = post_raw(
        &url,
        body.as_bytes(),
        &[("authorization", "Bearer sk-test-123")],
    );
    assert_eq!(s, 200, "{b}");
    server.shutdown().unwrap();
}

/// Opens a stream and reads its first chunk (the request is then running).
fn open_stream(url: &str, body: &Value) -> impl BufRead {
    let mut reader = open_sse(url, body);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first:?}");
    reader
}

#[test]
fn a_disconnect_frees_its_sequence_and_a_full_queue_refuses_at_once() {
    let server = start(|o| {
        o.parallel = 1;
        o.max_queue = 1;
    });
    let base = server.url();
    let url = format!("{base}/v1/completions");
    let long = json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true,
                      "temperature": 0, "stream": true});
    // The one slot is taken by a stream; one request waits; the next is refused at once.
    let mut running = open_stream(&url, &long);
    let mut line = String::new();
    running.read_line(&mut line).unwrap();
    assert_eq!(metric(&base, "sparsellm_active_sequences"), 1.0);
    let waiting = {
        let url = url.clone();
        std::thread::spawn(move || {
            post(
                &url,
                &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
            )
        })
    };
    wait_until("one request queued", || {
        metric(&base, "sparsellm_queue_depth") == 1.0
    });
    let t = Instant::now();
    let (s, b) = post_raw(
        &url,
        json!({"prompt": "Hi", "max_tokens": 4})
            .to_string()
            .as_bytes(),
        &[],
    );
    assert_eq!(error_object(s, 429, &b)["code"], "queue_full");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused late: {:?}",
        t.elapsed()
    );
    // The client of the stream goes away: its slot frees within a step, the waiting
    // request runs.
    drop(running);
    let (s, v) = waiting.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    wait_until("no active sequence", || {
        metric(&base, "sparsellm_active_sequences") == 0.0
    });
    assert_eq!(metric(&base, "sparsellm_client_disconnects_total"), 1.0);
    assert!(metric(&base, "sparsellm_completion_tokens_total") < 400.0);
    // A client that gives up on a whole (non-streamed) response frees its slot too.
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_millis(500)))
        .build()
        .into();
    let r = impatient
        .post(&url)
        .header("content-type", "application/json")
        .send(
            json!({"prompt": "Once", "max_tokens": 400, "ignore_eos": true})
                .to_string()
                .as_bytes(),
        );
    assert!(r.is_err(), "400 tokens in 0.5 s?");
    wait_until("the abandoned request freed", || {
        metric(&base, "sparsellm_active_sequences") == 0.0
    });
    assert_eq!(metric(&base, "sparsellm_client_disconnects_total"), 2.0);
    assert!(metric(&base, "sparsellm_completion_tokens_total") < 800.0);
    // Still serving.
    let v = ok(&url, &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // Many at once against one slot and one queue place: each answered 200 or 429 at
    // once, none hangs.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..6)
            .map(|i| {
                let url = url.clone();
                s.spawn(move || {
                    let body = json!({"prompt": format!("Story {i}:"), "max_tokens": 16,
                                      "ignore_eos": true});
                    let (st, b) = post_raw(&url, body.to_string().as_bytes(), &[]);
                    if st != 200 {
                        error_object(st, 429, &b);
                    }
                    st
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    server.shutdown().unwrap();
}

#[test]
fn a_sparse_server_reports_its_mlp_density() {
    let server = start(|o| {
        o.parallel = 2;
        o.sparse = sparsellm::session::SparseSettings {
            spec: "density:0.5".into(),
            ..Default::default()
        };
    });
    let base = server.url();
    let v = ok(
        &format!("{base}/v1/completions"),
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let d = metric(&base, "sparsellm_mlp_density");
    assert!((0.45..=0.55).contains(&d), "density {d}");
    server.shutdown().unwrap();
}
