//! The HTTP surface: the routes, the API-key and request-counting middleware, and the
//! handlers that turn an OpenAI request into scheduler parameters and the scheduler's
//! events into a response (one JSON body, or SSE chunks ending with `data: [DONE]`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use sha2::{Digest, Sha256};
use sparsellm::generate::SamplingOptions;
use sparsellm::session::LoadedModel;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tower_http::timeout::RequestBodyTimeoutLayer;

use crate::error::{ApiError, JsonBody};
use crate::metrics::Metrics;
use crate::openai::*;
use crate::scheduler::{Event, Job, Params, Queue, Refused, TokenLogprob};

/// Most alternatives listed per token (`top_logprobs`, completions' `logprobs`).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// What every handler shares.
pub struct AppState {
    pub model: Arc<LoadedModel>,
    /// The name /v1/models lists and responses carry.
    pub model_id: String,
    /// When the server started (seconds since the epoch): the model card's `created`.
    pub started: u64,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    /// Each sequence's context: prompt + max_tokens must fit.
    pub ctx_size: usize,
    /// SHA-256 of the API key: keys of any length compare in constant time.
    pub api_key_digest: Option<[u8; 32]>,
    pub next_id: AtomicU64,
    /// Seeds of requests that give none: a per-process random hash of a counter.
    pub seeds: RandomState,
    pub unseeded: AtomicU64,
}

type AppRef = Arc<AppState>;

/// The server's routes with their limits: the body cap (`body_limit` bytes), a timeout on
/// reading a body, the API key on everything but /health.
pub fn router(state: AppRef, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(health))
        .fallback(|| async { ApiError::not_found("This path is") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(
            body_limit,
            refuse_large_bodies,
        ))
        // Outermost: counts every answer, refusals included.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(RequestBodyTimeoutLayer::new(Duration::from_secs(60)))
        .with_state(state)
}

pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

async fn require_api_key(State(st): State<AppRef>, req: Request, next: Next) -> Response {
    if let Some(want) = &st.api_key_digest {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            });
        let ok = given.is_some_and(|k| bool::from(key_digest(k).ct_eq(want)));
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// A body announced larger than the cap is refused before any of it is read (a chunked
/// body is cut at the cap by `DefaultBodyLimit`, with the same error).
async fn refuse_large_bodies(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return ApiError::too_large(limit).into_response();
    }
    next.run(req).await
}

async fn count_requests(State(st): State<AppRef>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| match p.as_str() {
            "/v1/chat/completions" => "chat_completions",
            "/v1/completions" => "completions",
            "/v1/models" => "models",
            "/metrics" => "metrics",
            "/health" => "health",
            _ => "other",
        });
    let r = next.run(req).await;
    st.metrics
        .requests
        .with_label_values(&[endpoint, r.status().as_str()])
        .inc();
    r
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(st): State<AppRef>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.metrics.render(),
    )
}

async fn models(State(st): State<AppRef>) -> impl IntoResponse {
    axum::Json(ModelList {
        object: "list",
        data: vec![ModelCard {
            id: st.model_id.clone(),
            object: "model",
            created: st.started,
            owned_by: "sparsellm",
        }],
    })
}

/// A response's id, creation time and model name.
struct Meta {
    id: String,
    created: u64,
    model: String,
}

fn meta(st: &AppState, prefix: &str) -> Meta {
    Meta {
        id: format!(
            "{prefix}-{}",
            st.next_id.fetch_add(1, Ordering::Relaxed) + 1
        ),
        created: unix_now(),
        model: st.model_id.clone(),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn chat_completions(
    State(st): State<AppRef>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response, ApiError> {
    check_n(req.n)?;
    let messages = chat_messages(&req.messages)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(top_logprobs(k.unwrap_or(0), "top_logprobs")?),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                Some("top_logprobs"),
                "top_logprobs needs logprobs: true",
            ));
        }
        _ => None,
    };
    let model = st.model.clone();
    let prompt = blocking(move || {
        let refs: Vec<(&str, &str)> = messages
            .iter()
            .map(|(r, c)| (r.as_str(), c.as_str()))
            .collect();
        let text = model.render_chat(&refs, true)?;
        model.tokenizer.encode_prompt(&text)
    })
    .await?
    .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let params = params(&st, &req, logprobs, "messages", prompt.len())?;
    let rx = submit(&st, prompt, params)?;
    let meta = meta(&st, "chatcmpl");
    if req.stream == Some(true) {
        let include_usage = include_usage(&req.stream_options);
        return Ok(sse(rx, ChatChunks::new(meta, include_usage)));
    }
    let out = collect(rx).await?;
    Ok(axum::Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: FINGERPRINT,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content: out.text,
            },
            logprobs: out.logprobs.map(|l| chat_logprobs(&l)),
            finish_reason: out.finish_reason,
        }],
        usage: out.usage,
    })
    .into_response())
}

async fn completions(
    State(st): State<AppRef>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_n(req.n)?;
    let logprobs = req
        .logprobs
        .map(|k| top_logprobs(k, "logprobs"))
        .transpose()?;
    let prompt = match req.prompt.clone() {
        Prompt::Text(t) => t,
        Prompt::Texts(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Texts(v) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                format!(
                    "prompt: one prompt per request is served ({} given)",
                    v.len()
                ),
            ));
        }
        Prompt::Tokens(ids) => {
            let vocab = st.model.model.config.vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::invalid(
                    Some("prompt"),
                    format!("prompt: token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            return completion_with_ids(st, req, ids, logprobs).await;
        }
    };
    let model = st.model.clone();
    let ids = blocking(move || model.tokenizer.encode_prompt(&prompt))
        .await?
        .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    completion_with_ids(st, req, ids, logprobs).await
}

async fn completion_with_ids(
    st: AppRef,
    req: CompletionRequest,
    prompt: Vec<u32>,
    logprobs: Option<usize>,
) -> Result<Response, ApiError> {
    let params = params(&st, &req, logprobs, "prompt", prompt.len())?;
    let rx = submit(&st, prompt, params)?;
    let meta = meta(&st, "cmpl");
    if req.stream == Some(true) {
        let include_usage = include_usage(&req.stream_options);
        return Ok(sse(rx, CompletionChunks::new(meta, include_usage)));
    }
    let out = collect(rx).await?;
    let logprobs = out
        .logprobs
        .as_ref()
        .map(|l| completion_logprobs(l, &out.offsets));
    Ok(axum::Json(Completion {
        id: meta.id,
        object: "text_completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: FINGERPRINT,
        choices: vec![CompletionChoice {
            text: out.text,
            index: 0,
            logprobs,
            finish_reason: Some(out.finish_reason),
        }],
        usage: Some(Some(out.usage)),
    })
    .into_response())
}

/// Names the build in responses (OpenAI's `system_fingerprint`).
const FINGERPRINT: &str = concat!("sparsellm-", env!("CARGO_PKG_VERSION"));

/// Runs CPU work (tokenizing a prompt of up to the body limit) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("request processing failed: {e}")))
}

fn check_n(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::invalid(
            Some("n"),
            format!("n: only one choice per request is served (n = 1), not {n}"),
        )),
    }
}

fn top_logprobs(k: u32, field: &str) -> Result<usize, ApiError> {
    if k > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            Some(field),
            format!("{field}: at most {MAX_TOP_LOGPROBS}, not {k}"),
        ));
    }
    Ok(k as usize)
}

fn include_usage(o: &Option<StreamOptions>) -> bool {
    o.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}

/// The messages as (role, text): string contents, or text parts joined.
fn chat_messages(messages: &[ChatMessage]) -> Result<Vec<(String, String)>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages: at least one message is needed",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let text = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                let param = format!("messages[{i}].content[{j}]");
                                return Err(ApiError::invalid(
                                    Some(&param),
                                    format!(
                                        "{param}: only text content is understood (type \"text\" with a \"text\" field), not \"{kind}\""
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            Ok((m.role.clone(), text))
        })
        .collect()
}

/// The request's fields checked and turned into scheduler parameters; the context is
/// checked here, before the request is queued.
fn params(
    st: &AppState,
    req: &impl SamplingFields,
    logprobs: Option<usize>,
    prompt_field: &str,
    prompt_tokens: usize,
) -> Result<Params, ApiError> {
    let ctx = st.ctx_size;
    if prompt_tokens == 0 {
        return Err(ApiError::invalid(
            Some(prompt_field),
            format!("{prompt_field}: the prompt is empty"),
        ));
    }
    let max_tokens = match req.max_tokens() {
        Some(0) => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                "max_tokens must be at least 1",
            ));
        }
        Some(m) => m,
        None => ctx.saturating_sub(prompt_tokens) as u64,
    };
    if max_tokens == 0 || (prompt_tokens as u64).saturating_add(max_tokens) > ctx as u64 {
        return Err(ApiError::invalid(
            Some(prompt_field),
            format!(
                "This server's context is {ctx} tokens per request (--ctx-size); the prompt has {prompt_tokens} tokens and {max_tokens} more were asked for (max_tokens): {} in all. Shorten the prompt or lower max_tokens.",
                (prompt_tokens as u64).saturating_add(max_tokens.max(1))
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let range = |name: &str, v: Option<f32>, default: f32, ok: &dyn Fn(f32) -> bool, says: &str| {
        let v = v.unwrap_or(default);
        if v.is_finite() && ok(v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                Some(name),
                format!("{name}: {v} is out of range: must be {says}"),
            ))
        }
    };
    let sampling = SamplingOptions {
        temperature: range(
            "temperature",
            req.temperature(),
            1.0,
            &|t| t >= 0.0,
            ">= 0 (0 is greedy)",
        )?,
        top_p: range(
            "top_p",
            req.top_p(),
            1.0,
            &|p| p > 0.0 && p <= 1.0,
            "in (0, 1]",
        )?,
        top_k: req.top_k().unwrap_or(0) as usize,
        min_p: range(
            "min_p",
            req.min_p(),
            0.0,
            &|p| (0.0..=1.0).contains(&p),
            "in [0, 1]",
        )?,
        repeat_penalty: range(
            "repeat_penalty",
            req.repeat_penalty(),
            1.0,
            &|p| p > 0.0,
            "> 0 (1 is off)",
        )?,
        presence_penalty: range(
            "presence_penalty",
            req.presence_penalty(),
            0.0,
            &|p| (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
        )?,
        frequency_penalty: range(
            "frequency_penalty",
            req.frequency_penalty(),
            0.0,
            &|p| (-2.0..=2.0).contains(&p),
            "in [-2, 2]",
        )?,
        seed: match req.seed() {
            Some(s) => s as u64,
            None => st
                .seeds
                .hash_one(st.unseeded.fetch_add(1, Ordering::Relaxed)),
        },
        ..SamplingOptions::default()
    };
    Ok(Params {
        max_tokens: max_tokens as usize,
        sampling,
        stop: req.stop().map(Stop::into_vec).unwrap_or_default(),
        ignore_eos: req.ignore_eos().unwrap_or(false),
        logprobs,
    })
}

fn submit(
    st: &AppState,
    prompt: Vec<u32>,
    params: Params,
) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt,
        params,
        events: tx,
        arrived: Instant::now(),
    };
    match st.queue.submit(job) {
        Ok(()) => Ok(rx),
        Err(Refused::Full) => Err(ApiError::queue_full(st.queue.capacity())),
        Err(Refused::Closed) => Err(ApiError::shutting_down()),
    }
}

/// A whole generation, gathered from its events.
struct Collected {
    text: String,
    logprobs: Option<Vec<TokenLogprob>>,
    /// Where each token's text starts in `text` (completions' `text_offset`).
    offsets: Vec<usize>,
    finish_reason: FinishReason,
    usage: Usage,
}

async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs: Option<Vec<TokenLogprob>> = None;
    let mut offsets = Vec::new();
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { text: t, logprob } => {
                if let Some(l) = logprob {
                    offsets.push(text.len());
                    logprobs.get_or_insert_with(Vec::new).push(l);
                }
                text.push_str(&t);
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    offsets,
                    finish_reason,
                    usage: Usage::new(prompt_tokens, completion_tokens),
                });
            }
            Event::Error(m) => return Err(ApiError::internal(m)),
        }
    }
    Err(ApiError::internal(
        "the scheduler stopped before the request finished",
    ))
}

fn chat_logprobs(l: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: l
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(tok, lp)| TopLogprob {
                        token: tok.clone(),
                        logprob: *lp,
                        bytes: tok.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn completion_logprobs(l: &[TokenLogprob], offsets: &[usize]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: l.iter().map(|t| t.token.clone()).collect(),
        token_logprobs: l.iter().map(|t| t.logprob).collect(),
        top_logprobs: l
            .iter()
            .map(|t| {
                t.top
                    .iter()
                    .map(|(tok, lp)| (tok.clone(), serde_json::json!(lp)))
                    .collect()
            })
            .collect(),
        text_offset: offsets.to_vec(),
    }
}

/// Turns scheduler events into SSE `data:` payloads for one endpoint's chunk shape.
trait Chunks: Send + 'static {
    /// Payloads sent before any event.
    fn start(&mut self) -> Vec<String>;
    /// Payloads for one event; true when the stream ends after them.
    fn event(&mut self, e: Event) -> (Vec<String>, bool);
}

fn json<T: serde::Serialize>(v: &T) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn error_payload(message: String) -> String {
    json(&ApiError::internal(message).body())
}

/// The SSE response: the chunks of `rx`'s events, then `data: [DONE]`. When the client
/// goes away the stream (and with it `rx`) is dropped, which the scheduler notices.
fn sse(rx: UnboundedReceiver<Event>, mut chunks: impl Chunks) -> Response {
    struct S<C> {
        rx: UnboundedReceiver<Event>,
        chunks: C,
        pending: VecDeque<String>,
        ended: bool,
    }
    let pending: VecDeque<String> = chunks.start().into();
    let state = S {
        rx,
        chunks,
        pending,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(d) = s.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(d)), s));
            }
            if s.ended {
                return None;
            }
            match s.rx.recv().await {
                Some(e) => {
                    let (out, end) = s.chunks.event(e);
                    s.pending.extend(out);
                    s.ended = end;
                }
                None => {
                    s.pending.push_back(error_payload(
                        "the scheduler stopped before the request finished".into(),
                    ));
                    s.ended = true;
                }
            }
        }
    });
    sse_response(stream)
}

fn sse_response(
    stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
) -> Response {
    let mut r = Sse::new(stream).into_response();
    // A proxy (nginx) must pass each chunk on at once rather than buffer the stream.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

struct ChatChunks {
    meta: Meta,
    include_usage: bool,
}

impl ChatChunks {
    fn new(meta: Meta, include_usage: bool) -> ChatChunks {
        ChatChunks {
            meta,
            include_usage,
        }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        json(&ChatChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: FINGERPRINT,
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn choice(
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<FinishReason>,
    ) -> ChatChunkChoice {
        ChatChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish,
        }
    }
}

impl Chunks for ChatChunks {
    fn start(&mut self) -> Vec<String> {
        let delta = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        vec![self.chunk(vec![Self::choice(delta, None, None)], None)]
    }

    fn event(&mut self, e: Event) -> (Vec<String>, bool) {
        match e {
            Event::Token { text, logprob } => {
                if text.is_empty() && logprob.is_none() {
                    return (Vec::new(), false);
                }
                let delta = ChatDelta {
                    role: None,
                    content: Some(text),
                };
                let lp = logprob.map(|l| chat_logprobs(std::slice::from_ref(&l)));
                (
                    vec![self.chunk(vec![Self::choice(delta, lp, None)], None)],
                    false,
                )
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let last = Self::choice(ChatDelta::default(), None, Some(finish_reason));
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let usage = self
                    .include_usage
                    .then(|| self.chunk(Vec::new(), Some(usage)));
                closing(self.chunk(vec![last], None), usage)
            }
            Event::Error(m) => (vec![error_payload(m)], true),
        }
    }
}

/// A stream's last payloads: the chunk with the finish reason, the usage chunk when asked
/// for (`stream_options.include_usage`), then `[DONE]`; the stream ends.
fn closing(last: String, usage: Option<String>) -> (Vec<String>, bool) {
    let mut out = vec![last];
    out.extend(usage);
    out.push("[DONE]".into());
    (out, true)
}

struct CompletionChunks {
    meta: Meta,
    include_usage: bool,
    /// Length of the text sent so far (completions' `text_offset`).
    sent: usize,
}

impl CompletionChunks {
    fn new(meta: Meta, include_usage: bool) -> CompletionChunks {
        CompletionChunks {
            meta,
            include_usage,
            sent: 0,
        }
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        json(&Completion {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: FINGERPRINT,
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }
}

impl Chunks for CompletionChunks {
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }

    fn event(&mut self, e: Event) -> (Vec<String>, bool) {
        match e {
            Event::Token { text, logprob } => {
                if text.is_empty() && logprob.is_none() {
                    return (Vec::new(), false);
                }
                let logprobs = logprob.map(|l| completion_logprobs(&[l], &[self.sent]));
                self.sent += text.len();
                let choice = CompletionChoice {
                    text,
                    index: 0,
                    logprobs,
                    finish_reason: None,
                };
                (vec![self.chunk(vec![choice], None)], false)
            }
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = CompletionChoice {
                    text: String::new(),
                    index: 0,
                    logprobs: None,
                    finish_reason: Some(finish_reason),
                };
                let usage = Usage::new(prompt_tokens, completion_tokens);
                let usage = self
                    .include_usage
                    .then(|| self.chunk(Vec::new(), Some(usage)));
                closing(self.chunk(vec![choice], None), usage)
            }
            Event::Error(m) => (vec![error_payload(m)], true),
        }
    }
}
