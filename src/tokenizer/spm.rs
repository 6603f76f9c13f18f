//! The SentencePiece-style vocabulary of GGUF files (`tokenizer.ggml.model = "llama"`), as
//! llama.cpp tokenizes it (`llm_tokenizer_spm` in llama-vocab.cpp), so that both give the
//! same ids for the same file:
//!
//! 1. special tokens (control, user-defined and unknown types, longest text first) are cut
//!    out of the text as whole tokens;
//! 2. each remaining fragment gets a leading space when `add_space_prefix` is set and it
//!    starts the text or follows a special token, then spaces become `▁` (U+2581);
//! 3. the fragment starts as one symbol per character; repeatedly, the adjacent pair whose
//!    concatenation is a token with the highest score (leftmost on ties) is merged;
//! 4. each final symbol is its token, or (byte fallback) the `<0xXX>` tokens of its bytes.
//!
//! Decoding maps normal tokens back (`▁` to space), byte tokens to their byte, and special
//! tokens to their text; with `add_space_prefix`, the first piece's leading space goes.

use std::collections::{BinaryHeap, HashMap};

use crate::error::{Error, Result};
use crate::loader::GgufVocab;

/// GGUF token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// A SentencePiece vocabulary: token texts, scores and types, and the flags that shape
/// the input.
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    /// Text -> id; where a text occurs twice, the later id (as llama.cpp).
    by_text: HashMap<String, u32>,
    /// Byte -> its `<0xXX>` token (or the one-byte token), when the vocabulary has one.
    byte_ids: Vec<Option<u32>>,
    /// Control, user-defined and unknown tokens, longest text first: matched in the
    /// text before the SentencePiece merges.
    specials: Vec<u32>,
    add_space_prefix: bool,
}

/// A candidate merge of symbols `left` and `right` (indices), whose text is a token of
/// `score` and `size` bytes.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// The heap's top is the highest score, then the leftmost (llama.cpp's comparator).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

/// One symbol of a fragment being merged: `text[start..start + len]`, in a linked list.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

impl SpmTokenizer {
    /// Builds from GGUF metadata; checks that the arrays agree in length.
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<SpmTokenizer> {
        let n = v.tokens.len();
        if n == 0 {
            return Err(Error::Tokenizer("GGUF vocabulary has no tokens".into()));
        }
        if u32::try_from(n).is_err() {
            return Err(Error::Tokenizer(format!(
                "GGUF vocabulary has too many tokens ({n})"
            )));
        }
        for (name, len) in [
            ("tokenizer.ggml.scores", v.scores.len()),
            ("tokenizer.ggml.token_type", v.token_types.len()),
        ] {
            if len != 0 && len != n {
                return Err(Error::Tokenizer(format!(
                    "GGUF {name} has {len} entries but there are {n} tokens"
                )));
            }
        }
        let scores = if v.scores.is_empty() {
            vec![0.0; n]
        } else {
            v.scores.clone()
        };
        let types = if v.token_types.is_empty() {
            vec![NORMAL; n]
        } else {
            v.token_types.clone()
        };
        let mut by_text = HashMap::with_capacity(n);
        for (id, t) in v.tokens.iter().enumerate() {
            by_text.insert(t.clone(), id as u32);
        }
        let byte_ids = (0..=255u8)
            .map(|b| {
                by_text
                    .get(&format!("<0x{b:02X}>"))
                    .or_else(|| {
                        // llama.cpp falls back to the one-byte token text.
                        std::str::from_utf8(&[b]).ok().and_then(|s| by_text.get(s))
                    })
                    .copied()
            })
            .collect();
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(types[i as usize], CONTROL | USER_DEFINED | UNKNOWN)
                    && !v.tokens[i as usize].is_empty()
            })
            .collect();
        // Longest first; equal lengths by id, so the order is deterministic.
        specials.sort_by_key(|&i| std::cmp::Reverse(v.tokens[i as usize].len()));
        Ok(SpmTokenizer {
            tokens: v.tokens.clone(),
            scores,
            types,
            by_text,
            byte_ids,
            specials,
            // llama.cpp's defaults for an SPM vocabulary.
            add_space_prefix: v.add_space_prefix.unwrap_or(true),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_to_id(&self, text: &str) -> Option<u32> {
        self.by_text.get(text).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The ids of `text`; special tokens written in it map to their ids. No BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for frag in self.partition(text) {
            match frag {
                Fragment::Special(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    let mut s = String::with_capacity(t.len() + 3);
                    if self.add_space_prefix && prev_special {
                        s.push(' ');
                    }
                    s.push_str(t);
                    let s = s.replace(' ', "\u{2581}");
                    self.tokenize_fragment(&s, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// The text split at the special tokens (llama.cpp's `tokenizer_st_partition`: each
    /// special token in turn, longest first, is cut out of the text fragments left).
    fn partition<'a>(&self, text: &'a str) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.specials {
            let tok = self.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(tok)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) if t.contains(tok) => {
                        let mut rest = t;
                        while let Some(at) = rest.find(tok) {
                            if at > 0 {
                                next.push(Fragment::Text(&rest[..at]));
                            }
                            next.push(Fragment::Special(id));
                            rest = &rest[at + tok.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize` on one escaped fragment.
    fn tokenize_fragment(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut queue = BinaryHeap::new();
        let bigram = |syms: &[Symbol], l: Option<usize>, r: Option<usize>| -> Option<Bigram> {
            let (l, r) = (l?, r?);
            let (a, b) = (syms[l], syms[r]);
            let piece = &text[a.start..a.start + a.len + b.len];
            let id = *self.by_text.get(piece)?;
            Some(Bigram {
                left: l,
                right: r,
                score: self.scores[id as usize],
                size: piece.len(),
            })
        };
        for i in 1..syms.len() {
            if let Some(b) = bigram(&syms, Some(i - 1), Some(i)) {
                queue.push(b);
            }
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            // Stale: one side was merged since.
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if let Some(nx) = r.next {
                syms[nx].prev = Some(b.left);
            }
            let left = syms[b.left];
            if let Some(x) = bigram(&syms, left.prev, Some(b.left)) {
                queue.push(x);
            }
            if let Some(x) = bigram(&syms, Some(b.left), left.next) {
                queue.push(x);
            }
        }
        let mut i = (!syms.is_empty()).then_some(0);
        while let Some(k) = i {
            let s = syms[k];
            let piece = &text[s.start..s.start + s.len];
            match self.by_text.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        let id = self.byte_ids[byte as usize].ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "'{piece}' is not in the vocabulary, which has no byte token for 0x{byte:02X}"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// The bytes of `ids` as text (invalid UTF-8 becomes U+FFFD); control and unknown
    /// tokens as their text, or nothing with `skip_special` (as llama.cpp's
    /// `unparse_special`). An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let t = self.id_to_token(id).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "token id {id} is not in the vocabulary (size {})",
                    self.tokens.len()
                ))
            })?;
            let start = bytes.len();
            match self.types[id as usize] {
                CONTROL | UNKNOWN if skip_special => {}
                CONTROL | UNKNOWN | USER_DEFINED => bytes.extend_from_slice(t.as_bytes()),
                NORMAL => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
                BYTE => bytes.push(byte_of(t).ok_or_else(|| {
                    Error::Tokenizer(format!("byte token {id} '{t}' is not <0xXX>"))
                })?),
                // Unused and undefined tokens show nothing (as llama.cpp).
                _ => {}
            }
            if i == 0 && self.add_space_prefix && bytes.get(start) == Some(&b' ') {
                bytes.remove(start);
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The byte of a `<0xXX>` token.
fn byte_of(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2)
        .then(|| u8::from_str_radix(hex, 16).ok())
        .flatten()
}

/// A piece of the input: text for the SentencePiece merges, or a special token.
#[derive(Debug, Clone, Copy)]
enum Fragment<'a> {
    Text(&'a str),
    Special(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> SpmTokenizer {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<ctl>"].map(String::from).to_vec();
        let mut types = vec![UNKNOWN, CONTROL, CONTROL, CONTROL];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(BYTE);
        }
        for t in ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc"] {
            tokens.push(t.into());
            types.push(NORMAL);
        }
        let n = tokens.len();
        let mut scores = vec![0.0; n];
        // "▁ab" beats "bc"; "ab" beats "▁a".
        for (t, s) in [("▁a", -3.0), ("ab", -1.0), ("▁ab", -0.5), ("bc", -2.0)] {
            scores[tokens.iter().position(|x| x == t).unwrap()] = s;
        }
        SpmTokenizer::from_gguf_vocab(&GgufVocab {
            model: "llama".into(),
            tokens,
            scores,
            token_types: types,
            add_space_prefix: Some(true),
            ..Default::default()
        })
        .unwrap()
    }

    fn pieces(t: &SpmTokenizer, text: &str) -> Vec<String> {
        t.encode(text)
            .unwrap()
            .iter()
            .map(|&i| t.id_to_token(i).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn merges_by_score_with_byte_fallback_and_specials() {
        let t = vocab();
        // " abc": "ab" (-1) merges first, then "▁ab" (-0.5); "bc" lost its b.
        assert_eq!(pieces(&t, "abc"), ["▁ab", "c"]);
        // "é" is not in the vocabulary: its two UTF-8 bytes.
        assert_eq!(pieces(&t, "é"), ["▁", "<0xC3>", "<0xA9>"]);
        // A special token splits the text; the text after it gets the space prefix too.
        assert_eq!(pieces(&t, "a<ctl>a"), ["▁a", "<ctl>", "▁a"]);
        assert_eq!(t.encode("").unwrap(), Vec::<u32>::new());
        let ids = t.encode("abc é<ctl>").unwrap();
        assert_eq!(t.decode(&ids, false).unwrap(), "abc é<ctl>");
        assert_eq!(t.decode(&ids, true).unwrap(), "abc é");
    }
}
