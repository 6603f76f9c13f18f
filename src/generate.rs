//! Text generation: sampling (greedy, temperature, top-k, top-p, min-p with a seeded RNG;
//! a repetition penalty), stop conditions (EOS, stop strings, a token budget, the context
//! limit), streaming of decoded text, and the timings a user or benchmark wants (time to
//! first token, decode tokens/s).

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Llama, Logits, MlpOverride};
use crate::tokenizer::Tokenizer;

/// How the next token is picked from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: no limit).
    pub top_p: f32,
    /// Keep only tokens whose probability is at least `min_p` times the most likely
    /// token's (0: no limit). Probabilities at the sampling temperature, as for top_p.
    pub min_p: f32,
    /// llama.cpp's repetition penalty: the logit of every token seen among the last
    /// `repeat_last_n` tokens (prompt included) is divided by this when positive and
    /// multiplied by it when negative, once per distinct token, before any other rule
    /// (greedy decoding included). 1.0: off.
    pub repeat_penalty: f32,
    /// How many of the most recent tokens the repetition penalty looks at (0: none).
    pub repeat_last_n: usize,
    /// OpenAI's presence penalty: every token this sampler has already returned has its
    /// logit lowered by this (once, however often it was returned). 0.0: off.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty: every token this sampler has already returned has its
    /// logit lowered by this times the number of times it was returned. 0.0: off.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::Input(format!(
                "--min-p {} must be in [0, 1]",
                self.min_p
            )));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err(Error::Input(format!(
                "--repeat-penalty {} must be a finite number > 0",
                self.repeat_penalty
            )));
        }
        for (name, p) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !p.is_finite() {
                return Err(Error::Input(format!("{name} {p} must be a finite number")));
            }
        }
        Ok(())
    }
}

/// A small, reproducible random number generator (SplitMix64): the same seed gives the
/// same text on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One sequence's sampler: the options, the random state, and (when a presence or
/// frequency penalty is set) how often it has returned each token.
pub struct Sampler {
    opts: SamplingOptions,
    rng: SplitMix64,
    /// Token -> times returned; kept only while a presence or frequency penalty is set.
    returned: HashMap<u32, u32>,
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// llama.cpp's repetition penalty, in place: each distinct token of `recent` (ids past
/// the end of `logits` ignored) has its logit divided by `penalty` when positive and
/// multiplied by it otherwise, once however often it occurs.
pub fn apply_repeat_penalty(logits: &mut [f32], recent: &[u32], penalty: f32) {
    let mut seen: Vec<u32> = recent
        .iter()
        .copied()
        .filter(|&t| (t as usize) < logits.len())
        .collect();
    seen.sort_unstable();
    seen.dedup();
    for t in seen {
        let l = &mut logits[t as usize];
        if *l > 0.0 {
            *l /= penalty;
        } else {
            *l *= penalty;
        }
    }
}

/// OpenAI's presence and frequency penalties, in place: each token of `counts` (token,
/// times generated; ids past the end of `logits` ignored) has its logit lowered by
/// `presence` (count > 0) plus `frequency` times its count.
pub fn apply_presence_frequency_penalty(
    logits: &mut [f32],
    counts: impl IntoIterator<Item = (u32, u32)>,
    presence: f32,
    frequency: f32,
) {
    for (t, c) in counts {
        if let Some(l) = logits.get_mut(t as usize)
            && c > 0
        {
            *l -= presence + frequency * c as f32;
        }
    }
}

/// The log-probability of `token` under `logits` (a log-softmax), and the `top` most
/// likely tokens with theirs, most likely first (ties by lower id).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// [`TokenLogprobs`] of `token` (an id past the end of `logits` gets -inf).
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: a sum over a large vocabulary in f32 loses the small terms.
    let log_total = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln();
    let logprob = |l: f32| ((l - max) as f64 - log_total) as f32;
    let mut ranked: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let top = top.min(ranked.len());
    if top > 0 && top < ranked.len() {
        ranked.select_nth_unstable_by(top - 1, by_logit);
    }
    ranked.truncate(top);
    ranked.sort_unstable_by(by_logit);
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: ranked.into_iter().map(|(t, l)| (t, logprob(l))).collect(),
    }
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Sampler {
        Sampler {
            opts,
            rng: SplitMix64(opts.seed),
            returned: HashMap::new(),
        }
    }

    /// The next token after the tokens `history` (as [`sample_after`](Self::sample_after)),
    /// remembered for the presence and frequency penalties of the following calls.
    pub fn sample_next(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let t = self.sample_after(logits, history);
        if self.opts.presence_penalty != 0.0 || self.opts.frequency_penalty != 0.0 {
            *self.returned.entry(t).or_insert(0) += 1;
        }
        t
    }

    /// The next token given the logits alone (no repetition penalty: no history; the
    /// presence and frequency penalties count what [`sample_next`](Self::sample_next)
    /// returned).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_after(logits, &[])
    }

    /// The next token after the tokens `history` (prompt and output so far, oldest
    /// first): the repetition penalty looks at its last `repeat_last_n`; the presence and
    /// frequency penalties at the tokens [`sample_next`](Self::sample_next) returned.
    pub fn sample_after(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let o = self.opts;
        let n = o.repeat_last_n.min(history.len());
        let repeat = o.repeat_penalty != 1.0 && n > 0;
        let openai = !self.returned.is_empty();
        let logits: Cow<[f32]> = if repeat || openai {
            let mut l = logits.to_vec();
            if repeat {
                apply_repeat_penalty(&mut l, &history[history.len() - n..], o.repeat_penalty);
            }
            if openai {
                apply_presence_frequency_penalty(
                    &mut l,
                    self.returned.iter().map(|(&t, &c)| (t, c)),
                    o.presence_penalty,
                    o.frequency_penalty,
                );
            }
            Cow::Owned(l)
        } else {
            Cow::Borrowed(logits)
        };
        if o.temperature == 0.0 {
            return argmax(&logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if o.top_k > 0 && o.top_k < cand.len() {
            cand.select_nth_unstable_by(o.top_k - 1, by_logit);
            cand.truncate(o.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| (((l - max) / o.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= o.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if o.min_p > 0.0 {
            // Sorted descending: the most likely token is first and always kept.
            let floor = probs[0] * o.min_p as f64;
            let keep = probs.iter().position(|&p| p < floor).unwrap_or(probs.len());
            probs.truncate(keep.max(1));
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, &p) in probs.iter().enumerate() {
            if r < p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The model's context is full.
    ContextFull,
    /// The decoded text reached one of [`GenerateOptions::stop`].
    Stop,
    /// `on_text` asked to stop (e.g. its output was closed).
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    /// Stop at an end-of-sequence token (benchmarks turn this off for a fixed length).
    pub stop_at_eos: bool,
    /// Stop strings: generation ends as soon as the decoded text contains one; neither it
    /// nor anything after it is passed to `on_text` or kept in [`Generation::text`]. Text
    /// that could be the start of a stop string is held back until it is known not to
    /// be. Needs a tokenizer (without one there is no text to match).
    pub stop: Vec<String>,
}

impl GenerateOptions {
    /// `max_tokens` greedy tokens, no stop at EOS, no stop strings: a benchmark's run.
    pub fn fixed_greedy(max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampling: SamplingOptions::default(),
            stop_at_eos: false,
            stop: Vec::new(),
        }
    }
}

/// Streams text past a set of stop strings: [`push`](Self::push) returns what may be
/// shown now, holding back any tail that could begin a stop string.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match before any text).
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that can be shown now and whether a stop string was
    /// reached (then the text is everything before its first occurrence).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            return (std::mem::take(&mut self.held), true);
        }
        // The longest tail of the held text that is a proper prefix of a stop string (it
        // starts at a character boundary: it equals the start of a valid string).
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// The held-back text, once no more will come.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    /// The end-of-sequence token that ended the generation ([`StopReason::Eos`]): sampled,
    /// but not in `output_ids` (a model may have several).
    pub eos_id: Option<u32>,
    pub text: String,
    pub stop: StopReason,
    /// From the start of prefill to the first sampled token.
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    /// Tokens after the first, per second of decoding.
    pub decode_tok_s: f64,
    pub total_ms: f64,
}

/// Generates from `prompt_ids`, calling `on_text` with each newly completed piece of text;
/// `on_text` returning `Break` ends the generation ([`StopReason::Cancelled`]).
pub fn generate(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mlp: Option<&mut (dyn MlpOverride + '_)>,
    on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    generate_interruptible(model, tokenizer, prompt_ids, opts, mlp, on_text, || {
        ControlFlow::Continue(())
    })
}

/// As [`generate`], with `between_tokens` called after each sampled token, before the
/// next forward pass: `Break` ends the generation ([`StopReason::Cancelled`]) within one
/// token, even while `on_text` is not called (text held back by the stream decoder or a
/// stop string). A front end checks its cancel flag or pending signals (Ctrl-C) there.
pub fn generate_interruptible(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut mlp: Option<&mut (dyn MlpOverride + '_)>,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    mut between_tokens: impl FnMut() -> ControlFlow<()>,
) -> Result<Generation> {
    opts.sampling.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    let ctx = model.config.max_position_embeddings;
    if prompt_ids.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens but the model's context is {ctx} tokens",
            prompt_ids.len()
        )));
    }
    let eos = &model.config.eos_token_ids;
    // A model whose vocabulary is larger than its tokenizer's (a synthetic checkpoint, or
    // padded embeddings) must not emit ids the tokenizer cannot decode.
    let vocab = tokenizer.map_or(model.config.vocab_size, |t| {
        t.vocab_size().min(model.config.vocab_size)
    });
    let mut sampler = Sampler::new(opts.sampling);
    let mut stream = tokenizer.map(|t| t.stream_decoder());
    let mut matcher = StopMatcher::new(&opts.stop);
    // Prompt and output so far: the repetition penalty's window.
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut text = String::new();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let mut output = Vec::new();
    let mut stop = StopReason::MaxTokens;
    let mut eos_id = None;
    let mut ttft = 0.0;
    let mut first_at = start;
    let mut prefill_s = 0.0;
    if opts.max_tokens > 0 {
        let mut logits = model.forward(prompt_ids, &mut cache, Logits::Last, mlp.as_deref_mut())?;
        prefill_s = start.elapsed().as_secs_f64();
        loop {
            let next = sampler.sample_next(&logits[..vocab], &history);
            if output.is_empty() {
                first_at = Instant::now();
                ttft = (first_at - start).as_secs_f64() * 1e3;
            }
            if opts.stop_at_eos && eos.contains(&next) {
                stop = StopReason::Eos;
                eos_id = Some(next);
                break;
            }
            output.push(next);
            history.push(next);
            if let Some(s) = stream.as_mut() {
                let piece = s.push(next)?;
                if !piece.is_empty() {
                    let (shown, stopped) = matcher.push(&piece);
                    if stopped {
                        stop = StopReason::Stop;
                    }
                    if !shown.is_empty() {
                        text.push_str(&shown);
                        if on_text(&shown).is_break() && !stopped {
                            stop = StopReason::Cancelled;
                        }
                    }
                    if matches!(stop, StopReason::Stop | StopReason::Cancelled) {
                        break;
                    }
                }
            }
            if output.len() >= opts.max_tokens {
                break;
            }
            if cache.len() >= ctx {
                stop = StopReason::ContextFull;
                break;
            }
            if between_tokens().is_break() {
                stop = StopReason::Cancelled;
                break;
            }
            logits = model.forward(&[next], &mut cache, Logits::Last, mlp.as_deref_mut())?;
        }
    }
    if let Some(s) = stream.as_mut()
        && !matches!(stop, StopReason::Stop | StopReason::Cancelled)
    {
        let (mut rest, stopped) = matcher.push(&s.finish()?);
        if stopped {
            stop = StopReason::Stop;
        } else {
            rest.push_str(&matcher.finish());
        }
        if !rest.is_empty() {
            text.push_str(&rest);
            // The last piece: stopping now changes nothing.
            let _ = on_text(&rest);
        }
    }
    let end = Instant::now();
    let decode_s = (end - first_at).as_secs_f64();
    let decoded = output.len().saturating_sub(1);
    Ok(Generation {
        output_ids: output,
        eos_id,
        text,
        stop,
        ttft_ms: ttft,
        prefill_tok_s: if prefill_s > 0.0 {
            prompt_ids.len() as f64 / prefill_s
        } else {
            0.0
        },
        decode_tok_s: if decoded > 0 && decode_s > 0.0 {
            decoded as f64 / decode_s
        } else {
            0.0
        },
        total_ms: (end - start).as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let mut g = Sampler::new(SamplingOptions::default());
        assert_eq!(g.sample(&logits), argmax(&logits));
        let o = SamplingOptions {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: 42,
            ..SamplingOptions::default()
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(o);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(o);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        // top-k 20 keeps only the 20 largest logits.
        let mut sorted = logits.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        assert!(a.iter().all(|&t| logits[t as usize] >= sorted[19]));
        // Different seeds give different draws.
        let mut s = Sampler::new(SamplingOptions { seed: 7, ..o });
        let c: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_tiny_is_greedy() {
        let logits = [1.0, 5.0, 2.0, 4.9];
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 3,
            ..SamplingOptions::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut l = [2.0, -1.0, 0.0, 3.0, -0.5];
        // Token 0 twice, token 1 once, token 3 never, an id past the vocabulary ignored.
        apply_repeat_penalty(&mut l, &[0, 1, 0, 2, 99], 2.0);
        assert_eq!(l, [1.0, -2.0, 0.0, 3.0, -0.5]);
        // Penalty 1 changes nothing.
        let mut m = [2.0, -1.0];
        apply_repeat_penalty(&mut m, &[0, 1], 1.0);
        assert_eq!(m, [2.0, -1.0]);
    }

    #[test]
    fn repeat_penalty_steers_greedy_within_the_last_n_tokens() {
        // Token 0 leads token 1 by a little: penalized, it loses (3.0 / 1.5 = 2.0 < 2.5).
        let logits = [3.0, 2.5, 1.0];
        let opts = |penalty, last_n| SamplingOptions {
            repeat_penalty: penalty,
            repeat_last_n: last_n,
            ..SamplingOptions::default()
        };
        let mut s = Sampler::new(opts(1.5, 64));
        assert_eq!(s.sample_after(&logits, &[2, 0]), 1);
        // Without history, or off, or with token 0 outside the last N: token 0.
        assert_eq!(s.sample_after(&logits, &[]), 0);
        assert_eq!(s.sample(&logits), 0);
        assert_eq!(Sampler::new(opts(1.0, 64)).sample_after(&logits, &[0]), 0);
        assert_eq!(Sampler::new(opts(1.5, 1)).sample_after(&logits, &[0, 2]), 0);
        assert_eq!(Sampler::new(opts(1.5, 0)).sample_after(&logits, &[0]), 0);
        // The penalty applies before sampling too: at a tiny top-p only the (penalized)
        // most likely token remains.
        let mut t = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_p: 1e-6,
            ..opts(1.5, 64)
        });
        for _ in 0..10 {
            assert_eq!(t.sample_after(&logits, &[0]), 1);
        }
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        // logit -= presence·[count > 0] + frequency·count; ids past the vocabulary ignored.
        let mut l = [1.0, 1.0, 1.0, 1.0];
        apply_presence_frequency_penalty(&mut l, [(0, 1), (1, 3), (2, 0), (9, 5)], 0.5, 0.25);
        assert_eq!(l, [0.25, -0.25, 1.0, 1.0]);
    }

    #[test]
    fn a_frequency_penalty_counts_what_the_sampler_returned() {
        // Greedy over fixed logits: token 0 leads token 1 by 0.5.
        let logits = [3.0, 2.5, 1.0];
        let run = |presence, frequency| {
            let mut s = Sampler::new(SamplingOptions {
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingOptions::default()
            });
            (0..4)
                .map(|_| s.sample_next(&logits, &[]))
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(0.0, 0.0), [0, 0, 0, 0]);
        // Frequency 0.3: 0 (3.0), 0 (2.7), 1 (0 at 2.4 < 2.5), 0 (2.4 > 1 at 2.2).
        assert_eq!(run(0.0, 0.3), [0, 0, 1, 0]);
        // Presence 1: 0, then 1 (0 at 2.0), then 0 (2.0 > 1.5), then 0 again (counts
        // do not matter to presence).
        assert_eq!(run(1.0, 0.0), [0, 1, 0, 0]);
        // A negative presence penalty rewards repeats.
        assert_eq!(run(-1.0, 0.0), [0, 0, 0, 0]);
        // `sample` and `sample_after` do not record what they return.
        let mut s = Sampler::new(SamplingOptions {
            frequency_penalty: 1.0,
            ..SamplingOptions::default()
        });
        assert_eq!([s.sample(&logits), s.sample(&logits)], [0, 0]);
        assert!(
            SamplingOptions {
                presence_penalty: f32::INFINITY,
                ..SamplingOptions::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn token_logprobs_is_a_log_softmax_with_the_top_tokens() {
        // Probabilities 8/15, 4/15, 2/15, 1/15 (logits are logs of 8, 4, 2, 1 plus 5).
        let logits: Vec<f32> = [2f32, 8.0, 1.0, 4.0].iter().map(|p| p.ln() + 5.0).collect();
        let lp = token_logprobs(&logits, 3, 2);
        assert!((lp.logprob - (4.0f32 / 15.0).ln()).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].0, lp.top[1].0), (1, 3));
        assert!((lp.top[0].1 - (8.0f32 / 15.0).ln()).abs() < 1e-6);
        assert!((lp.top[1].1 - lp.logprob).abs() < 1e-7);
        // All of them: probabilities sum to 1; no top asked, none given; more than the
        // vocabulary, the whole vocabulary; an id past it has probability 0.
        let all = token_logprobs(&logits, 0, 10);
        assert_eq!(all.top.len(), 4);
        let total: f32 = all.top.iter().map(|&(_, l)| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 7, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn min_p_keeps_tokens_at_least_p_times_the_most_likely() {
        // Probabilities at temperature 1 proportional to 8, 4, 2, 1 (logits ln of those).
        let logits: Vec<f32> = [8f32, 4.0, 2.0, 1.0].iter().map(|p| p.ln()).collect();
        let drawn = |min_p: f32| {
            let mut s = Sampler::new(SamplingOptions {
                temperature: 1.0,
                min_p,
                seed: 11,
                ..SamplingOptions::default()
            });
            let mut seen = [false; 4];
            for _ in 0..2000 {
                seen[s.sample(&logits) as usize] = true;
            }
            seen
        };
        // min_p 0.45: p >= 0.45·p_max keeps 8 and 4 only; 0.2 keeps 2 too (2 >= 0.2·8).
        assert_eq!(drawn(0.45), [true, true, false, false]);
        assert_eq!(drawn(0.2), [true, true, true, false]);
        assert_eq!(drawn(0.0), [true, true, true, true]);
        assert_eq!(drawn(1.0), [true, false, false, false]);
    }

    #[test]
    fn sampling_options_are_validated() {
        let ok = SamplingOptions::default();
        assert!(ok.validate().is_ok());
        for bad in [
            SamplingOptions { min_p: 1.5, ..ok },
            SamplingOptions { min_p: -0.1, ..ok },
            SamplingOptions {
                repeat_penalty: 0.0,
                ..ok
            },
            SamplingOptions {
                repeat_penalty: f32::NAN,
                ..ok
            },
            SamplingOptions {
                temperature: f32::NAN,
                ..ok
            },
            SamplingOptions { top_p: 0.0, ..ok },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Input(_))), "{bad:?}");
        }
    }

    #[test]
    fn stop_strings_end_the_text_and_are_never_shown() {
        let stops = vec!["</end>".to_string(), "\n\n".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut shown = String::new();
        let mut stopped = false;
        for piece in ["Hello", " wor", "ld<", "/e", "nd> and more"] {
            let (s, stop) = m.push(piece);
            shown.push_str(&s);
            if stop {
                stopped = true;
                break;
            }
            // Nothing that could begin a stop string is shown early.
            assert!(
                !shown.ends_with('<') && !shown.ends_with("</e"),
                "{shown:?}"
            );
        }
        assert!(stopped);
        assert_eq!(shown, "Hello world");
        // A false start is released once it cannot be a stop string any more.
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("a</e"), ("a".to_string(), false));
        assert_eq!(m.push("x"), ("</ex".to_string(), false));
        assert_eq!(m.push("<"), (String::new(), false));
        assert_eq!(m.finish(), "<");
        // The earliest of several stop strings wins; multi-byte text stays whole.
        let mut m = StopMatcher::new(&["é!".to_string(), "b".to_string()]);
        assert_eq!(m.push("ça é"), ("ça ".to_string(), false));
        assert_eq!(m.push("!b"), (String::new(), true));
        // No stop strings (or only empty ones): everything passes through.
        let mut m = StopMatcher::new(&[String::new()]);
        assert_eq!(m.push("abc"), ("abc".to_string(), false));
    }
}
