//! Tokenizer against the reference fixtures (HuggingFace's ids for SmolLM2, tests/fixtures),
//! from both sources: the committed tokenizer.json and the GGUF file's metadata; stream
//! decoding, chat templates and bad vocabularies.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sha2::{Digest, Sha256};
use sparsellm::loader::{GgufVocab, TokenizerSource};
use sparsellm::tokenizer::{CHATML_TEMPLATE, ChatTemplate, Tokenizer};

/// The default model file: `$SPARSELLM_MODELS_DIR` (default `models/` in the crate root).
fn model_path() -> PathBuf {
    common::model_path()
}

fn reference() -> &'static serde_json::Value {
    static R: OnceLock<serde_json::Value> = OnceLock::new();
    R.get_or_init(common::reference)
}

fn json_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::load(&TokenizerSource::Json(common::tokenizer_json()))
            .expect("load tokenizer.json")
    })
}

fn gguf_vocab() -> &'static GgufVocab {
    static V: OnceLock<GgufVocab> = OnceLock::new();
    V.get_or_init(|| {
        let path = model_path();
        let model = sparsellm::loader::open(&path).unwrap_or_else(|e| {
            panic!("{e} (set SPARSELLM_MODELS_DIR to the directory holding the model)")
        });
        match model.tokenizer_source().expect("tokenizer source") {
            TokenizerSource::Gguf(v) => v,
            other => panic!("expected a GGUF vocabulary, got {other:?}"),
        }
    })
}

fn gguf_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::load(&TokenizerSource::Gguf(gguf_vocab().clone())).expect("GGUF tokenizer")
    })
}

fn both() -> [(&'static str, &'static Tokenizer); 2] {
    [
        ("tokenizer.json", json_tokenizer()),
        ("GGUF", gguf_tokenizer()),
    ]
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn fixture_cases() -> Vec<(String, Vec<u32>)> {
    let cases = reference()["tokenizer"]
        .as_array()
        .expect("tokenizer cases");
    assert_eq!(cases.len(), 8);
    cases
        .iter()
        .map(|c| {
            (
                c["text"].as_str().expect("text").to_owned(),
                ids_of(&c["ids"]),
            )
        })
        .collect()
}

#[test]
fn reference_cases_match_from_both_sources() {
    for (source, tok) in both() {
        for (text, ids) in fixture_cases() {
            assert_eq!(tok.encode(&text).unwrap(), ids, "{source}: {text:?}");
        }
    }
}

#[test]
fn gpl3_ids_match_from_both_sources() {
    let p = &reference()["perplexity"];
    let path = Path::new("/usr/share/common-licenses/GPL-3");
    let bytes = std::fs::read(path).expect("GPL-3 text");
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sha,
        p["text_sha256"].as_str().unwrap(),
        "GPL-3 differs from the reference's"
    );
    let text = String::from_utf8(bytes).expect("UTF-8");
    let expected = ids_of(&p["ids"]);
    assert_eq!(expected.len(), 7639);
    for (source, tok) in both() {
        let ids = tok.encode(&text).unwrap();
        if let Some(i) = ids.iter().zip(&expected).position(|(a, b)| a != b) {
            panic!(
                "{source}: first difference at token {i}: {} vs {}",
                ids[i], expected[i]
            );
        }
        assert_eq!(ids.len(), expected.len(), "{source}");
        assert_eq!(
            tok.decode(&ids).unwrap(),
            text,
            "{source}: GPL-3 round trip"
        );
    }
}

#[test]
fn vocabulary_and_special_ids() {
    for (source, tok) in both() {
        assert_eq!(tok.vocab_size(), 49152, "{source}");
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(1), "{source}");
        assert_eq!(
            tok.id_to_token(2).as_deref(),
            Some("<|im_end|>"),
            "{source}"
        );
        assert_eq!(tok.id_to_token(260).as_deref(), Some("Ġthe"), "{source}");
        assert_eq!(tok.id_to_token(49152), None, "{source}");
    }
    // GGUF metadata names them; the bare committed tokenizer.json has no config next to it.
    assert_eq!(gguf_tokenizer().bos_token_id(), Some(1));
    assert_eq!(gguf_tokenizer().eos_token_id(), Some(2));
    assert_eq!(json_tokenizer().bos_token_id(), None);
    assert_eq!(json_tokenizer().eos_token_id(), None);
}

/// A copy of the committed tokenizer.json in a temporary directory, with `extra` files next
/// to it.
fn json_with_neighbours(extra: &[(&str, &str)]) -> Tokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::copy(common::tokenizer_json(), &path).unwrap();
    for (name, content) in extra {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    Tokenizer::from_json_file(&path).unwrap()
}

#[test]
fn json_special_ids_from_neighbouring_configs() {
    let tok = json_with_neighbours(&[(
        "tokenizer_config.json",
        r#"{"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}"#,
    )]);
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));

    let tok = json_with_neighbours(&[(
        "config.json",
        r#"{"bos_token_id": 1, "eos_token_id": [2, 0]}"#,
    )]);
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));

    // tokenizer_config.json wins over config.json.
    let tok = json_with_neighbours(&[
        ("tokenizer_config.json", r#"{"eos_token": "<|endoftext|>"}"#),
        ("config.json", r#"{"bos_token_id": 1, "eos_token_id": 2}"#),
    ]);
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(0)));
}

#[test]
fn json_special_ids_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::copy(common::tokenizer_json(), &path).unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"eos_token": "<nope>"}"#,
    )
    .unwrap();
    let err = Tokenizer::from_json_file(&path).unwrap_err().to_string();
    assert!(err.contains("<nope>"), "{err}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
    assert!(Tokenizer::from_json_file(&path).is_err());

    std::fs::write(dir.path().join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"eos_token_id": 99999}"#).unwrap();
    let err = Tokenizer::from_json_file(&path).unwrap_err().to_string();
    assert!(err.contains("99999"), "{err}");
}

#[test]
fn bad_tokenizer_json_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    assert!(Tokenizer::from_json_file(&path).is_err(), "missing file");
    std::fs::write(&path, "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_json_file(&path).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// A tiny Llama-3 style tokenizer.json: its post-processor puts `<s>` in front of `$A`.
#[test]
fn json_bos_from_template_post_processor() {
    let json = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}}
      ]},
      "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, "merges": [["a", "b"]]}
    }"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let tok = Tokenizer::from_json_file(&path).unwrap();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_id(), None);
    // Encoding never inserts the BOS the post-processor would add.
    assert_eq!(tok.encode("<s>ab").unwrap(), vec![0, 4]);
    assert_eq!(tok.decode(&[0, 4, 1]).unwrap(), "<s>ab</s>");
}

#[test]
fn decode_round_trips_the_fixtures() {
    for (source, tok) in both() {
        for (text, ids) in fixture_cases() {
            assert_eq!(tok.decode(&ids).unwrap(), text, "{source}");
        }
    }
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    for (source, tok) in both() {
        let err = tok.decode(&[19556, 49152]).unwrap_err().to_string();
        assert!(err.contains("49152"), "{source}: {err}");
        assert!(tok.stream_decoder().push(u32::MAX).is_err(), "{source}");
    }
}

/// Pushes `ids` one at a time; returns the chunks (finish's last).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut dec = tok.stream_decoder();
    let mut chunks: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    chunks.push(dec.finish().unwrap());
    chunks
}

#[test]
fn stream_decoder_holds_back_incomplete_characters() {
    let text = "naïve café 日本語 🙂 <|im_end|> Straße 東京 🚀✨ done";
    for (source, tok) in both() {
        let ids = tok.encode(text).unwrap();
        // Decoding token by token on its own produces broken characters: the case at hand.
        let naive_broken = ids
            .iter()
            .filter(|&&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}'))
            .count();
        assert!(
            naive_broken > 0,
            "{source}: the text should split characters across tokens"
        );
        let chunks = stream(tok, &ids);
        for (i, c) in chunks.iter().enumerate() {
            assert!(
                !c.contains('\u{FFFD}'),
                "{source}: U+FFFD in chunk {i}: {c:?}"
            );
        }
        assert!(
            chunks.iter().any(String::is_empty),
            "{source}: nothing was held back"
        );
        assert_eq!(chunks.last().unwrap(), "", "{source}: finish had text left");
        assert_eq!(chunks.concat(), text, "{source}");
    }
}

#[test]
fn stream_decoder_finish_flushes_an_incomplete_character() {
    let tok = json_tokenizer();
    let ids = tok.encode("ok 🚀✨ 東京").unwrap();
    // Cut the ids where a character's bytes are split.
    let cut_at = (1..=ids.len())
        .find(|&n| tok.decode(&ids[..n]).unwrap().ends_with('\u{FFFD}'))
        .expect("a token boundary inside a character");
    let cut = &ids[..cut_at];
    let mut dec = tok.stream_decoder();
    let pushed: String = cut.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert!(!pushed.contains('\u{FFFD}'), "{pushed:?}");
    let rest = dec.finish().unwrap();
    assert!(rest.ends_with('\u{FFFD}'), "{rest:?}");
    assert_eq!(format!("{pushed}{rest}"), tok.decode(cut).unwrap());
    // After finish the decoder starts afresh.
    assert_eq!(dec.push(ids[0]).unwrap(), "ok");
}

proptest! {
    // A failing case is kept under target/, not as tests/*.proptest-regressions in the tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/proptest-regressions/tokenizer.txt"
        )))),
        ..ProptestConfig::with_cases(64)
    })]

    #[test]
    fn round_trip_any_text(text in "\\PC{0,40}") {
        let tok = json_tokenizer();
        let ids = tok.encode(&text).unwrap();
        prop_assert_eq!(tok.decode(&ids).unwrap(), text.clone());
        prop_assert_eq!(stream(tok, &ids).concat(), text);
    }

    /// On arbitrary ids (which may form invalid UTF-8), the stream gives what one decode gives.
    #[test]
    fn stream_equals_decode_on_any_ids(ids in proptest::collection::vec(0u32..49152, 0..24)) {
        let tok = json_tokenizer();
        prop_assert_eq!(stream(tok, &ids).concat(), tok.decode(&ids).unwrap());
    }
}

// ---- chat templates ----

/// SmolLM2-135M-Instruct's GGUF `tokenizer.chat_template`.
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn smollm2_template() {
    let t = ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
    assert_eq!(
        t.render(&[("user", "What is 2+2?")], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[("system", "Be brief."), ("user", "Hi")], false)
            .unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // The rendered prompt tokenizes with the chat markers as single tokens.
    let ids = json_tokenizer()
        .encode(&t.render(&[("user", "Hi")], true).unwrap())
        .unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids[ids.len() - 4..], [1, 520, 9531, 198]);
}

#[test]
fn chatml_fallback() {
    let t = ChatTemplate::new(CHATML_TEMPLATE, "", "").unwrap();
    assert_eq!(
        t.render(&[("system", "S"), ("user", "What is 2+2?")], true)
            .unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.render(&[("user", "x")], false).unwrap(),
        "<|im_start|>user\nx<|im_end|>\n"
    );
    // Same text as the reference fixture's chat prompt, same ids.
    let (text, ids) = fixture_cases().into_iter().nth(6).unwrap();
    let user_turn = t.render(&[("user", "What is 2+2?")], true).unwrap();
    assert_eq!(user_turn, text);
    assert_eq!(json_tokenizer().encode(&user_turn).unwrap(), ids);
}

/// A multi-line template in the style of real HF templates: trim_blocks and lstrip_blocks,
/// loop variables, Python string methods, raise_exception, bos/eos. The expected string is what
/// Python's jinja2 gives with HF's settings (ImmutableSandboxedEnvironment, trim_blocks=True,
/// lstrip_blocks=True).
const HF_STYLE_TEMPLATE: &str = "{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] == 'system' %}
[SYS]{{ message['content'].strip() }}
    {% elif message['content'].startswith('!') %}
[{{ loop.index0 }}:{{ message['role'].upper() }}!]{{ message['content'][1:] }}
    {% else %}
[{{ loop.index }}:{{ message['role'] }}]{{ message['content'] | trim }}{% if loop.last %}{{ eos_token }}{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
[assistant]
{% endif %}
";

#[test]
fn hf_style_template_matches_jinja2() {
    let t = ChatTemplate::new(HF_STYLE_TEMPLATE, "<s>", "</s>").unwrap();
    let msgs = [
        ("system", "  be brief \n"),
        ("user", "!hi"),
        ("assistant", " ok "),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<s>\n[SYS]be brief\n[1:USER!]hi\n[3:assistant]ok</s>\n[assistant]\n"
    );
    let err = t.render(&[("tool", "x")], false).unwrap_err().to_string();
    assert!(err.contains("bad role tool"), "{err}");
}

#[test]
fn raise_exception_is_an_error() {
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    assert_eq!(t.render(&[("user", "x")], false).unwrap(), "ok");
    let err = t
        .render(&[("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Conversation must start with user"), "{err}");
}

#[test]
fn template_compile_error_is_an_error() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m }}", "", "").unwrap_err();
    assert!(err.to_string().contains("chat template"), "{err}");
    assert!(ChatTemplate::new("{{ messages[0]['role'] ", "", "").is_err());
}

// ---- GGUF vocabularies: other pre-tokenizers, bad input ----

/// GPT-2's byte-to-character map: the 256 single-byte tokens of a byte-level vocabulary.
fn byte_level_alphabet() -> Vec<String> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// A small gpt2 vocabulary: a control token, the byte alphabet, and merges 1+2, 3+4, 12+3.
fn tiny_vocab(pre: Option<&str>) -> GgufVocab {
    let mut tokens = vec!["<|end|>".to_owned()];
    tokens.extend(byte_level_alphabet());
    tokens.extend(["12", "34", "123"].map(String::from));
    let mut token_types = vec![1; tokens.len()];
    token_types[0] = 3;
    GgufVocab {
        model: "gpt2".into(),
        pre: pre.map(String::from),
        merges: ["1 2", "3 4", "12 3"].map(String::from).to_vec(),
        tokens,
        token_types,
        bos_token_id: None,
        eos_token_id: Some(0),
        ..Default::default()
    }
}

#[test]
fn gguf_pre_tokenizers_differ_as_they_should() {
    let encode = |pre: Option<&str>, text: &str| -> Vec<String> {
        let tok = Tokenizer::from_gguf_vocab(&tiny_vocab(pre)).unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        ids.iter().map(|&id| tok.id_to_token(id).unwrap()).collect()
    };
    // GPT-2 keeps "1234" as one piece (merges 1+2 then 3+4); Llama-3 splits numbers into runs
    // of at most 3 digits; SmolLM splits every digit.
    assert_eq!(encode(Some("gpt2"), "1234"), ["12", "34"]);
    assert_eq!(encode(None, "1234"), ["12", "34"]);
    assert_eq!(encode(Some("llama-bpe"), "1234"), ["123", "4"]);
    assert_eq!(encode(Some("smollm"), "1234"), ["1", "2", "3", "4"]);
    // The control token is matched whole in text, and has the EOS id.
    let tok = Tokenizer::from_gguf_vocab(&tiny_vocab(Some("smollm"))).unwrap();
    assert_eq!(tok.encode("a<|end|>").unwrap()[1], 0);
    assert_eq!(tok.eos_token_id(), Some(0));
    assert_eq!(tok.vocab_size(), 260);
}

fn gguf_err(v: &GgufVocab) -> String {
    Tokenizer::from_gguf_vocab(v).unwrap_err().to_string()
}

#[test]
fn gguf_bad_vocabularies_are_errors() {
    let mut v = tiny_vocab(None);
    v.model = "bert".into();
    assert!(gguf_err(&v).contains("tokenizer model 'bert' is not supported yet"));
    // A SentencePiece vocabulary whose scores do not match its tokens.
    let mut v = tiny_vocab(None);
    v.model = "llama".into();
    v.scores = vec![0.0; 3];
    assert!(
        gguf_err(&v).contains("scores has 3 entries"),
        "{}",
        gguf_err(&v)
    );

    let mut v = tiny_vocab(None);
    v.pre = Some("qwen9".into());
    assert!(gguf_err(&v).contains("'qwen9'"));

    let mut v = tiny_vocab(None);
    v.merges.push("1 zz".into());
    assert!(gguf_err(&v).contains("'zz'"));

    let mut v = tiny_vocab(None);
    v.merges.push("3 5".into()); // both sides exist, the result "35" does not
    assert!(gguf_err(&v).contains("'35'"));

    let mut v = tiny_vocab(None);
    v.merges.push("12".into());
    assert!(gguf_err(&v).contains("'12'"));

    let mut v = tiny_vocab(None);
    v.token_types.pop();
    assert!(gguf_err(&v).contains("token_type"));

    let mut v = tiny_vocab(None);
    v.bos_token_id = Some(260);
    assert!(gguf_err(&v).contains("260"));

    let v = GgufVocab {
        model: "gpt2".into(),
        ..Default::default()
    };
    assert!(gguf_err(&v).contains("no tokens"));
}

#[test]
fn gguf_real_vocabulary_with_bad_edits() {
    let mut v = gguf_vocab().clone();
    v.model = "unigram".into();
    assert!(gguf_err(&v).contains("not supported yet"));

    let mut v = gguf_vocab().clone();
    v.merges[100] = "Ġ nosuchtoken".into();
    assert!(gguf_err(&v).contains("nosuchtoken"));

    let mut v = gguf_vocab().clone();
    v.token_types.truncate(100);
    assert!(gguf_err(&v).contains("100"));
}

/// Real HF templates use `{% break %}`/`{% continue %}` (jinja2's loopcontrols extension, which
/// HF enables) and the `tojson` filter (tool definitions).
#[test]
fn loop_controls_and_tojson() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}|{{ messages[0].role | tojson }}",
        "",
        "",
    )
    .unwrap();
    let out = t.render(
        &[("system", "s"), ("user", "a"), ("user", "b"), ("user", "c")],
        false,
    );
    assert_eq!(out.unwrap(), "ab|\"system\"");
}
