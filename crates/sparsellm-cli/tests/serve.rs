//! `sparsellm serve` as a process: its listening line, its flags' checks, and SIGTERM
//! during a stream (the stream ends cleanly, the process exits 0). The HTTP API itself is
//! tested in crates/sparsellm-server/tests.

#[path = "../../../tests/common/bin.rs"]
mod bin;
#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn serve(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sparsellm"))
        .arg("serve")
        .args(args)
        .env("SPARSELLM_MODELS_DIR", common::models_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sparsellm serve")
}

/// Waits up to `limit` for the child to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[cfg(unix)]
#[test]
fn sigterm_during_a_stream_finishes_it_and_exits_0() {
    let mut child = serve(&["--port", "0", "--parallel", "2", "--ctx-size", "256"]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    // "sparsellm serve: listening on http://127.0.0.1:PORT (model M, parallel 2,
    // ctx-size 256, KV cache at most N MiB)"
    for part in [
        "listening on http://127.0.0.1:",
        "parallel 2",
        "ctx-size 256",
        "MiB)",
    ] {
        assert!(line.contains(part), "{line:?}");
    }
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_owned();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": true,
                      "temperature": 0, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = agent
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string().as_bytes())
        .expect("POST");
    let mut reader = BufReader::new(r.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: {"), "{first:?}");
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    // The stream runs to its end.
    let mut data: Vec<String> = vec![first.trim_end()["data: ".len()..].to_owned()];
    for l in reader.lines() {
        let l = l.expect("the stream ends cleanly");
        if let Some(d) = l.strip_prefix("data: ") {
            data.push(d.to_owned());
        }
    }
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 48, "{usage}");
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    let status = wait_exit(&mut child, Duration::from_secs(30));
    if status.is_none() {
        let _ = child.kill();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // No longer listening.
    let addr = url.trim_start_matches("http://");
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn serve_flags_are_checked() {
    let o = bin::run(["serve", "--ctx-size", "1000000", "--port", "0"]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("--ctx-size 1000000"), "{o:?}");
    assert!(o.stderr.contains("context"), "{o:?}");
    assert!(o.stdout.is_empty());
    for (flag, value) in [
        ("--parallel", "0"),
        ("--port", "70000"),
        ("--max-queue", "-1"),
    ] {
        let o = bin::run(["serve", flag, value]);
        assert_eq!(o.code, Some(2), "{flag} {value}: {o:?}");
        assert!(o.stderr.contains(flag), "{o:?}");
    }
    let o = bin::run(["serve", "--api-key", ""]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("--api-key"), "{o:?}");
    let o = bin::run(["serve", "--help"]);
    for flag in [
        "--host",
        "--port",
        "--parallel",
        "--ctx-size",
        "--api-key",
        "--max-queue",
        "--sparsity",
        "--dtype",
        "--threads",
        "/v1/chat/completions",
    ] {
        assert!(
            o.stdout.contains(flag),
            "{flag} not in --help:\n{}",
            o.stdout
        );
    }
}
