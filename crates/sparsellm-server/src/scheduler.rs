//! Continuous batching: one OS thread owns the model (and the sparse mode's state) and
//! runs every sequence. Requests wait in a bounded queue; up to `parallel` of them hold a
//! slot, each with its own KV cache, sampler, stop matcher and stream decoder. Each step:
//! admit waiting requests into free slots, drop the sequences whose client went away,
//! read at most `prefill_chunk` prompt tokens (so running streams keep flowing while a
//! long prompt is read), then decode one token for every decoding sequence in a single
//! `forward_batch` and send each its text.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use sparsellm::generate::{Sampler, SamplingOptions, StopMatcher, token_logprobs};
use sparsellm::model::{BatchItem, KvCache, Logits, MlpOverride};
use sparsellm::session::{LoadedModel, SparseSettings};
use sparsellm::sparse::Sparsity;
use sparsellm::tokenizer::StreamDecoder;
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;
use crate::openai::FinishReason;

/// What a request asks the scheduler for, once validated and tokenized.
#[derive(Debug, Clone)]
pub struct Params {
    /// At least 1; prompt + max_tokens fits the context (checked before queueing).
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Log-probabilities wanted, with this many alternatives per token.
    pub logprobs: Option<usize>,
}

/// One generated token's log-probabilities, its text as the tokenizer decodes it alone.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// What the scheduler sends back about a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token: the text it makes visible (may be empty: an incomplete
    /// character, or text that could begin a stop string, is held back).
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The end: no events follow.
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed on this request: no events follow.
    Error(String),
}

/// A request in the queue.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: Params,
    pub events: UnboundedSender<Event>,
    /// When the request arrived (time to first token counts from here).
    pub arrived: Instant,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `parallel + max_queue` requests are running or waiting already.
    Full,
    /// The server is shutting down (or its scheduler has stopped).
    Closed,
}

struct QueueState {
    waiting: VecDeque<Job>,
    /// Jobs holding a slot.
    active: usize,
    closed: bool,
}

/// The bounded queue between the HTTP handlers and the scheduler thread.
pub struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
    parallel: usize,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

impl Queue {
    pub fn new(parallel: usize, max_queue: usize, metrics: Arc<Metrics>) -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                waiting: VecDeque::new(),
                active: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            parallel,
            max_queue,
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every update leaves the state consistent: a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests that may be running or waiting at once.
    pub fn capacity(&self) -> usize {
        self.parallel + self.max_queue
    }

    /// Queues `job`, or refuses it at once.
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let mut s = self.lock();
        if s.closed {
            return Err(Refused::Closed);
        }
        if s.waiting.len() + s.active >= self.capacity() {
            return Err(Refused::Full);
        }
        s.waiting.push_back(job);
        self.metrics.queue_depth.set(s.waiting.len() as i64);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// Refuses new jobs from now on; the scheduler finishes the queued and running ones,
    /// then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// Up to `free` waiting jobs, each now holding a slot. Blocks while nothing runs
    /// (`free == parallel`) and nothing waits; None once closed with nothing left.
    fn admit(&self, free: usize) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            let n = free.min(s.waiting.len());
            if n > 0 || free < self.parallel {
                let jobs: Vec<Job> = s.waiting.drain(..n).collect();
                s.active += jobs.len();
                self.metrics.queue_depth.set(s.waiting.len() as i64);
                return Some(jobs);
            }
            if s.closed {
                return None;
            }
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A slot is free again.
    fn release(&self, n: usize) {
        let mut s = self.lock();
        s.active = s.active.saturating_sub(n);
    }

    /// The scheduler is gone: refuse new jobs and drop the waiting ones (their handlers
    /// see their event channel close).
    fn abandon(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.waiting.clear();
        s.active = 0;
        self.metrics.queue_depth.set(0);
    }
}

/// Closes the queue when the scheduler thread ends, a panic included, so that no handler
/// waits for a scheduler that is gone.
struct AbandonOnDrop(Arc<Queue>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub parallel: usize,
    /// Prompt tokens read per step by one prefilling sequence.
    pub prefill_chunk: usize,
}

/// Starts the scheduler thread: it builds the sparse mode (reported before any request is
/// taken), then serves the queue until it is closed and drained.
pub fn start(
    model: Arc<LoadedModel>,
    sparse: SparseSettings,
    config: SchedulerConfig,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread = std::thread::Builder::new()
        .name("sparsellm-scheduler".into())
        .spawn(move || {
            let _abandon = AbandonOnDrop(queue.clone());
            let mut sparsity = match sparse.build(&model.model) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut s = Scheduler {
                loaded: &model,
                config,
                queue: &queue,
                metrics: &metrics,
                sparsity: sparsity.as_mut(),
                vocab: model
                    .tokenizer
                    .vocab_size()
                    .min(model.model.config.vocab_size),
            };
            s.run();
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(anyhow::anyhow!(e))
        }
        Err(_) => {
            let _ = thread.join();
            Err(anyhow::anyhow!(
                "the scheduler thread stopped while starting"
            ))
        }
    }
}

struct Scheduler<'m> {
    loaded: &'m LoadedModel,
    config: SchedulerConfig,
    queue: &'m Queue,
    metrics: &'m Metrics,
    sparsity: Option<&'m mut Sparsity>,
    /// Ids the tokenizer can decode (a padded embedding may have more rows).
    vocab: usize,
}

/// One request holding a slot.
struct Sequence<'m> {
    job: Job,
    cache: KvCache,
    /// Prompt tokens in the cache.
    prefilled: usize,
    sampler: Sampler,
    /// Prompt and output so far (the repetition penalty's window).
    history: Vec<u32>,
    generated: usize,
    /// The last sampled token, to be decoded next step.
    next: Option<u32>,
    decoder: StreamDecoder<'m>,
    matcher: StopMatcher,
    last_token_at: Option<Instant>,
    finished: bool,
    /// Its client went away (its event channel is closed).
    disconnected: bool,
}

impl<'m> Scheduler<'m> {
    fn hook(&mut self) -> Option<&mut (dyn MlpOverride + '_)> {
        self.sparsity.as_deref_mut().map(|s| s.as_override())
    }

    fn run(&mut self) {
        let mut seqs: Vec<Sequence<'m>> = Vec::new();
        loop {
            let Some(jobs) = self.queue.admit(self.config.parallel - seqs.len()) else {
                return;
            };
            for job in jobs {
                self.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
                seqs.push(self.sequence(job));
            }
            // A client that went away frees its slot before any more work is done for it.
            for s in &mut seqs {
                if !s.finished && s.job.events.is_closed() {
                    s.disconnected = true;
                    s.finished = true;
                }
            }
            self.retire(&mut seqs);
            self.metrics.active_sequences.set(seqs.len() as i64);
            if seqs.is_empty() {
                continue;
            }
            self.prefill_step(&mut seqs);
            self.decode_step(&mut seqs);
            self.retire(&mut seqs);
            self.metrics.active_sequences.set(seqs.len() as i64);
            self.metrics
                .kv_cache_tokens
                .set(seqs.iter().map(|s| s.cache.len() as i64).sum());
            if let Some(sp) = self.sparsity.as_deref() {
                let d = sp.density();
                if let (Some(g), Some(d)) = (&self.metrics.mlp_density, d) {
                    g.set(d);
                }
                if let (Some(g), Some(d)) = (&self.metrics.input_density, d) {
                    g.set(d);
                }
            }
        }
    }

    fn sequence(&self, job: Job) -> Sequence<'m> {
        let model = &self.loaded.model;
        Sequence {
            cache: model.new_cache(),
            prefilled: 0,
            sampler: Sampler::new(job.params.sampling),
            history: job.prompt.clone(),
            generated: 0,
            next: None,
            decoder: self.loaded.tokenizer.stream_decoder(),
            matcher: StopMatcher::new(&job.params.stop),
            last_token_at: None,
            finished: false,
            disconnected: false,
            job,
        }
    }

    /// Drops finished sequences and frees their slots.
    fn retire(&self, seqs: &mut Vec<Sequence<'m>>) {
        let gone = seqs.iter().filter(|s| s.disconnected).count();
        self.metrics.disconnects.inc_by(gone as u64);
        let before = seqs.len();
        seqs.retain(|s| !s.finished);
        self.queue.release(before - seqs.len());
    }

    /// Reads prompt chunks, oldest sequence first, up to `prefill_chunk` tokens in all
    /// (at least one chunk): several short prompts start in one step, a long one takes a
    /// step per chunk. A prompt is always cut at multiples of `prefill_chunk` from its
    /// start, whatever else is prefilling, so its logits never depend on other requests.
    /// A prompt's last chunk gives the logits of its first generated token.
    fn prefill_step(&mut self, seqs: &mut [Sequence<'m>]) {
        let chunk = self.config.prefill_chunk.max(1);
        let loaded: &'m LoadedModel = self.loaded;
        let model = &loaded.model;
        let mut used = 0;
        for s in seqs.iter_mut() {
            let (start, len) = (s.prefilled, s.job.prompt.len());
            if s.finished || start >= len {
                continue;
            }
            let end = (start + chunk).min(len);
            if used > 0 && used + (end - start) > chunk {
                break;
            }
            used += end - start;
            let last = end == len;
            let r = model.forward(
                &s.job.prompt[start..end],
                &mut s.cache,
                if last { Logits::Last } else { Logits::None },
                self.hook(),
            );
            match r {
                Ok(logits) => {
                    s.prefilled = end;
                    if last {
                        self.accept(s, &logits);
                    }
                }
                Err(e) => fail(s, format!("prefill failed: {e}")),
            }
        }
    }

    /// One batched forward over every decoding sequence, then one token for each.
    fn decode_step(&mut self, seqs: &mut [Sequence<'m>]) {
        let mut decoding: Vec<&mut Sequence<'m>> = seqs
            .iter_mut()
            .filter(|s| !s.finished && s.next.is_some())
            .collect();
        if decoding.is_empty() {
            return;
        }
        self.metrics
            .decode_batch_size
            .observe(decoding.len() as f64);
        let loaded: &'m LoadedModel = self.loaded;
        let model = &loaded.model;
        let row = model.config.vocab_size;
        let result = {
            let mut items: Vec<BatchItem<'_>> = decoding
                .iter_mut()
                .filter_map(|s| {
                    Some(BatchItem {
                        token: s.next?,
                        cache: &mut s.cache,
                    })
                })
                .collect();
            let hook = self.hook();
            model.forward_batch(&mut items, hook)
        };
        match result {
            Ok(logits) if logits.len() == row * decoding.len() => {
                for (s, l) in decoding.into_iter().zip(logits.chunks_exact(row)) {
                    self.accept(s, l);
                }
            }
            Ok(logits) => {
                let msg = format!(
                    "decode returned {} logits for {} sequences of {row}",
                    logits.len(),
                    decoding.len()
                );
                decoding.into_iter().for_each(|s| fail(s, msg.clone()));
            }
            Err(e) => {
                let msg = format!("decode failed: {e}");
                decoding.into_iter().for_each(|s| fail(s, msg.clone()));
            }
        }
    }

    /// Samples the sequence's next token from `logits` ([vocab]) and sends what it shows;
    /// ends the sequence at EOS, a stop string or its token budget.
    fn accept(&self, s: &mut Sequence<'m>, logits: &[f32]) {
        let logits = &logits[..self.vocab.min(logits.len())];
        let next = s.sampler.sample_next(logits, &s.history);
        let now = Instant::now();
        match s.last_token_at {
            None => self
                .metrics
                .time_to_first_token
                .observe((now - s.job.arrived).as_secs_f64()),
            Some(t) => self
                .metrics
                .time_per_output_token
                .observe((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        s.next = None;
        let eos = &self.loaded.model.config.eos_token_ids;
        if !s.job.params.ignore_eos && eos.contains(&next) {
            self.finish(s, FinishReason::Stop);
            return;
        }
        s.history.push(next);
        s.generated += 1;
        self.metrics.completion_tokens.inc();
        let logprob = s.job.params.logprobs.map(|k| {
            let lp = token_logprobs(logits, next, k);
            TokenLogprob {
                token: self.token_text(next),
                logprob: lp.logprob,
                top: lp
                    .top
                    .into_iter()
                    .map(|(t, l)| (self.token_text(t), l))
                    .collect(),
            }
        });
        let piece = match s.decoder.push(next) {
            Ok(p) => p,
            Err(e) => return fail(s, format!("decoding token {next} failed: {e}")),
        };
        let (text, stopped) = if piece.is_empty() {
            (String::new(), false)
        } else {
            s.matcher.push(&piece)
        };
        send(s, Event::Token { text, logprob });
        if stopped {
            self.done(s, FinishReason::Stop);
        } else if s.generated >= s.job.params.max_tokens {
            self.finish(s, FinishReason::Length);
        } else {
            s.next = Some(next);
        }
    }

    /// Ends a sequence that did not stop at a stop string: the text held back is sent
    /// (cut at a stop string if it completes one).
    fn finish(&self, s: &mut Sequence<'m>, mut reason: FinishReason) {
        let rest = match s.decoder.finish() {
            Ok(r) => r,
            Err(e) => return fail(s, format!("decoding failed: {e}")),
        };
        let (mut text, stopped) = s.matcher.push(&rest);
        if stopped {
            reason = FinishReason::Stop;
        } else {
            text.push_str(&s.matcher.finish());
        }
        if !text.is_empty() {
            send(
                s,
                Event::Token {
                    text,
                    logprob: None,
                },
            );
        }
        self.done(s, reason);
    }

    fn done(&self, s: &mut Sequence<'m>, finish_reason: FinishReason) {
        send(
            s,
            Event::Done {
                finish_reason,
                prompt_tokens: s.job.prompt.len(),
                completion_tokens: s.generated,
            },
        );
        s.finished = true;
    }

    fn token_text(&self, id: u32) -> String {
        self.loaded.tokenizer.decode(&[id]).unwrap_or_default()
    }
}

fn send(s: &mut Sequence<'_>, e: Event) {
    // A closed channel: the client went away; the next step retires the sequence.
    if s.job.events.send(e).is_err() {
        s.disconnected = true;
        s.finished = true;
    }
}

fn fail(s: &mut Sequence<'_>, message: String) {
    let _ = s.job.events.send(Event::Error(message));
    s.finished = true;
}
