//! The HuggingFace checkpoint loader: a real SmolLM2 checkpoint made from the GGUF by
//! scripts/make_hf_checkpoint.py (f32 and bf16), a synthetic sharded checkpoint, config
//! parsing, and hostile files that must give errors, never panics.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use sparsellm::loader::hf::{HfModel, parse_config};
use sparsellm::loader::safetensors::SafetensorsFile;
use sparsellm::loader::{SourceDType, TokenizerSource, WeightSource};
use sparsellm::model::config::{Llama3RopeScaling, ModelConfig, RopeScaling, RopeStyle};

mod common;

use common::{LAYER_TENSORS, f32s, hf_checkpoint};

/// Every tensor SmolLM2-135M has, with its HF shape.
fn smollm2_shapes() -> Vec<(String, Vec<usize>)> {
    let mut v = vec![
        ("model.embed_tokens.weight".to_string(), vec![49152, 576]),
        ("model.norm.weight".to_string(), vec![576]),
    ];
    for i in 0..30 {
        for (part, shape) in LAYER_TENSORS.iter().zip([
            vec![576, 576],
            vec![192, 576],
            vec![192, 576],
            vec![576, 576],
            vec![1536, 576],
            vec![1536, 576],
            vec![576, 1536],
            vec![576],
            vec![576],
        ]) {
            v.push((format!("model.layers.{i}.{part}.weight"), shape));
        }
    }
    v
}

fn check_smollm2(m: &HfModel, dtype: SourceDType) {
    let c = m.config();
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_layers, 30);
    assert_eq!(c.num_heads, 9);
    assert_eq!(c.num_kv_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.rope_scaling, None);
    assert_eq!(c.rope_style, RopeStyle::Halves);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.bos_token_id.is_some());
    assert_eq!(c.eos_token_ids.len(), 1);

    let shapes = smollm2_shapes();
    assert_eq!(shapes.len(), 30 * 9 + 2);
    assert_eq!(m.tensor_names().count(), shapes.len());
    for (name, shape) in &shapes {
        assert!(m.has_tensor(name), "{name}");
        let t = m.tensor(name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(t.dtype, dtype, "{name}");
        assert_eq!(t.bytes().len(), t.numel() * dtype.block().1, "{name}");
        assert_eq!(&t.name, name);
    }
    // Tied: no lm_head; the model uses the embedding.
    assert!(!m.has_tensor("lm_head.weight"));
    let e = err_of(m.tensor("lm_head.weight"));
    assert!(
        e.contains("lm_head.weight") && e.contains("model.safetensors"),
        "{e}"
    );

    match m.tokenizer_source().unwrap() {
        TokenizerSource::Json(p) => assert!(p.ends_with("tokenizer.json") && p.is_file()),
        other => panic!("{other:?}"),
    }
    let tpl = m.chat_template().expect("chat template");
    assert!(tpl.contains("<|im_start|>"), "{tpl}");
    let id = m.identity();
    assert!(
        id.starts_with("hf:hf-") && id.ends_with(":llama:30x576"),
        "{id}"
    );
}

#[test]
fn smollm2_f32_checkpoint() {
    let dir = hf_checkpoint("f32");
    let m = HfModel::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    check_smollm2(&m, SourceDType::F32);
    assert_eq!(m.path(), dir.as_path());

    // Values: numpy (through the Python safetensors package) reads the same floats.
    let name = "model.layers.0.mlp.gate_proj.weight";
    let ours = f32s(m.tensor(name).unwrap().bytes());
    let script = format!(
        "from safetensors.numpy import safe_open\n\
         f = safe_open({:?}, 'numpy')\n\
         t = f.get_tensor({name:?})\n\
         print(t.shape, ' '.join(repr(float(x)) for x in list(t.reshape(-1)[:8]) + list(t.reshape(-1)[-8:])))",
        dir.join("model.safetensors").to_str().unwrap()
    );
    let out = common::python(
        &script,
        std::iter::empty::<&str>(),
        &["safetensors", "numpy"],
    );
    let (shape, vals) = out.trim().split_once(") ").unwrap();
    assert_eq!(shape, "(1536, 576");
    let vals: Vec<f32> = vals.split(' ').map(|s| s.parse().unwrap()).collect();
    let mut want = ours[..8].to_vec();
    want.extend_from_slice(&ours[ours.len() - 8..]);
    assert_eq!(vals, want);
    assert!(want.iter().any(|&x| x != 0.0));

    // And a second, independent Rust reader (the safetensors crate) agrees byte for byte
    // on every tensor.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 272);
    for (name, view) in st.tensors() {
        let t = m.tensor(&name).unwrap();
        assert_eq!(view.shape(), t.shape.as_slice(), "{name}");
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        assert!(view.data() == t.bytes(), "{name}");
    }

    // The generic entry point routes a directory here.
    let src = sparsellm::loader::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(src.config().num_layers, 30);
    assert!(src.has_tensor(name));
}

#[test]
fn smollm2_bf16_checkpoint() {
    let dir = hf_checkpoint("bf16");
    let m = HfModel::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    check_smollm2(&m, SourceDType::BF16);
    // Each bf16 value is the f32 checkpoint's value rounded to nearest even.
    let f = HfModel::open(&hf_checkpoint("f32")).unwrap();
    for name in [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.norm.weight",
    ] {
        let want: Vec<u16> = f32s(f.tensor(name).unwrap().bytes())
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_bits())
            .collect();
        let got: Vec<u16> = m
            .tensor(name)
            .unwrap()
            .bytes()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "{name}");
    }
}

// ---------------------------------------------------------------------------------------
// Synthetic checkpoints.

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "vocab_size": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": [2, 3], "hidden_act": "silu"
    })
}

/// The tiny model's tensors: name, shape, and f32 values (tensor k, element i = k*1000 + i).
fn tiny_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut shapes = vec![
        ("model.embed_tokens.weight".to_string(), vec![16, 8]),
        ("model.norm.weight".to_string(), vec![8]),
        ("lm_head.weight".to_string(), vec![16, 8]),
    ];
    for i in 0..2 {
        for (p, s) in LAYER_TENSORS.iter().zip([
            vec![8, 8],
            vec![4, 8],
            vec![4, 8],
            vec![8, 8],
            vec![16, 8],
            vec![16, 8],
            vec![8, 16],
            vec![8],
            vec![8],
        ]) {
            shapes.push((format!("model.layers.{i}.{p}.weight"), s));
        }
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let numel: usize = s.iter().product();
            let vals = (0..numel).map(|i| (k * 1000 + i) as f32).collect();
            (n, s, vals)
        })
        .collect()
}

/// safetensors bytes for `tensors`, written by the `safetensors` crate.
fn serialize(tensors: &[&(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bufs: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bufs)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

/// A tiny single-file checkpoint.
fn tiny_single(dir: &Path) {
    write_json(&dir.join("config.json"), &tiny_config());
    let t = tiny_tensors();
    std::fs::write(
        dir.join("model.safetensors"),
        serialize(&t.iter().collect::<Vec<_>>()),
    )
    .unwrap();
}

/// A tiny checkpoint in two shards (layer 0 + embeddings, layer 1 + head) with an index.
fn tiny_sharded(dir: &Path) -> HashMap<String, String> {
    write_json(&dir.join("config.json"), &tiny_config());
    let t = tiny_tensors();
    let (a, b): (Vec<_>, Vec<_>) = t
        .iter()
        .partition(|(n, _, _)| n.contains("layers.0.") || n.contains("embed"));
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    std::fs::write(dir.join(names[0]), serialize(&a)).unwrap();
    std::fs::write(dir.join(names[1]), serialize(&b)).unwrap();
    let map: HashMap<String, String> = a
        .iter()
        .map(|(n, _, _)| (n.clone(), names[0].to_string()))
        .chain(b.iter().map(|(n, _, _)| (n.clone(), names[1].to_string())))
        .collect();
    write_json(
        &dir.join("model.safetensors.index.json"),
        &serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map}),
    );
    map
}

#[test]
fn sharded_checkpoint() {
    let d = tmpdir();
    let map = tiny_sharded(d.path());
    let m = HfModel::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.files().len(), 2);
    let c = m.config();
    assert_eq!(
        (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads),
        (8, 2, 2, 1)
    );
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2, 3]);
    assert!(!c.tie_word_embeddings);
    for (k, (name, shape, vals)) in tiny_tensors().into_iter().enumerate() {
        let t = m.tensor(&name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.shape, shape);
        assert_eq!(f32s(t.bytes()), vals, "{name} (tensor {k})");
        assert!(
            t.path.ends_with(&map[&name]),
            "{name} from {}",
            t.path.display()
        );
    }
    // Tensors came from both shards.
    assert!(
        m.tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .path
            .ends_with("model-00001-of-00002.safetensors")
    );
    assert!(
        m.tensor("lm_head.weight")
            .unwrap()
            .path
            .ends_with("model-00002-of-00002.safetensors")
    );
    let e = err_of(m.tensor("model.layers.2.mlp.up_proj.weight"));
    assert!(
        e.contains("model.layers.2.mlp.up_proj.weight") && e.contains("index.json"),
        "{e}"
    );
    // No tokenizer in this directory: a clear error, not a panic.
    let e = m.tokenizer_source().unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    assert_eq!(m.chat_template(), None);
}

#[test]
fn single_file_tiny_checkpoint_and_chat_template_list() {
    let d = tmpdir();
    tiny_single(d.path());
    write_json(
        &d.path().join("tokenizer_config.json"),
        &serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}),
    );
    let m = HfModel::open(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.chat_template().as_deref(), Some("D"));
    assert!(m.has_tensor("lm_head.weight"));
    assert_eq!(
        f32s(m.tensor("model.norm.weight").unwrap().bytes())[3],
        1003.0
    );
}

#[test]
fn config_parsing() {
    let mut c = tiny_config();
    c["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let cfg = parse_config(&c.to_string()).unwrap();
    assert_eq!(
        cfg.rope_scaling,
        Some(RopeScaling::Llama3(Llama3RopeScaling {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }))
    );
    // The older spelling `type`.
    c["rope_scaling"]["type"] = c["rope_scaling"]["rope_type"].take();
    c["rope_scaling"]
        .as_object_mut()
        .unwrap()
        .remove("rope_type");
    assert!(parse_config(&c.to_string()).unwrap().rope_scaling.is_some());

    // Linear scaling divides every frequency by the factor.
    c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
    let cfg = parse_config(&c.to_string()).unwrap();
    assert_eq!(cfg.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    let unscaled = ModelConfig {
        rope_scaling: None,
        ..cfg.clone()
    };
    for (a, b) in cfg.rope_inv_freq().iter().zip(unscaled.rope_inv_freq()) {
        assert!((a * 2.0 - b).abs() <= b * 1e-6, "{a} vs {b}");
    }
    c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": -1.0});
    let e = parse_config(&c.to_string()).unwrap_err().to_string();
    assert!(e.contains("must be positive"), "{e}");

    // Other rope types are refused by name.
    c["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 2.0});
    let e = parse_config(&c.to_string()).unwrap_err().to_string();
    assert!(e.contains("'yarn' is not supported"), "{e}");

    // Defaults: kv heads = heads, head_dim = hidden/heads, theta 10000, untied, eos int.
    let min = serde_json::json!({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100,
        "eos_token_id": 7
    });
    let cfg = parse_config(&min.to_string()).unwrap();
    assert_eq!((cfg.num_kv_heads, cfg.head_dim), (4, 16));
    assert_eq!(cfg.rope_theta, 10000.0);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.eos_token_ids, vec![7]);
    assert_eq!(cfg.bos_token_id, None);

    // head_dim override (hidden != heads * head_dim is allowed).
    let mut o = min.clone();
    o["head_dim"] = 32.into();
    assert_eq!(parse_config(&o.to_string()).unwrap().q_dim(), 128);

    // Mistral is a family we run (a sliding window when it has one); Falcon is not.
    let mut m = tiny_config();
    m["model_type"] = "mistral".into();
    m["architectures"] = serde_json::json!(["MistralForCausalLM"]);
    m["sliding_window"] = 4.into();
    let c = parse_config(&m.to_string()).unwrap();
    assert_eq!(c.family, sparsellm::model::config::Family::Mistral);
    assert_eq!(c.window(1), Some(4));
    m["model_type"] = "falcon".into();
    m["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    let e = parse_config(&m.to_string()).unwrap_err().to_string();
    assert!(e.contains("unsupported architecture falcon"), "{e}");
    let e = parse_config(r#"{"hidden_size": 8}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unsupported architecture"), "{e}");
    let mut g = tiny_config();
    g["hidden_act"] = "gelu".into();
    assert!(
        parse_config(&g.to_string())
            .unwrap_err()
            .to_string()
            .contains("gelu")
    );
}

// ---------------------------------------------------------------------------------------
// Hostile inputs: every one is an Err with a helpful message, never a panic.

/// Writes a tiny checkpoint whose model.safetensors is `bytes`, and returns the error
/// opening it gives.
fn open_err_with_weights(bytes: &[u8]) -> String {
    let d = tmpdir();
    write_json(&d.path().join("config.json"), &tiny_config());
    std::fs::write(d.path().join("model.safetensors"), bytes).unwrap();
    match HfModel::open(d.path()) {
        Ok(_) => panic!("opened a hostile file"),
        Err(e) => e.to_string(),
    }
}

fn st_file(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data_len, 0);
    v
}

/// The message of an expected error (`RawTensor` has no Debug, so no `unwrap_err`).
fn err_of<T>(r: sparsellm::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(e: &str, want: &str) {
    assert!(e.contains(want), "error {e:?} should contain {want:?}");
}

#[test]
fn hostile_safetensors() {
    let good = serialize(&tiny_tensors().iter().collect::<Vec<_>>());
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // Truncated in the length prefix, in the header, in the data.
    assert_contains(&open_err_with_weights(&good[..5]), "too short");
    assert_contains(&open_err_with_weights(&good[..8 + n / 2]), "truncated");
    let e = open_err_with_weights(&good[..good.len() - 3]);
    assert_contains(&e, "run past the end of the data");
    assert_contains(&e, "model.safetensors");

    // Header length larger than the file, and absurdly large.
    let mut big = good.clone();
    big[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
    assert_contains(&open_err_with_weights(&big), "runs past the end");
    big[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_contains(&open_err_with_weights(&big), "exceeds");

    // Garbage header.
    assert_contains(
        &open_err_with_weights(&st_file("[1,2,3]  ", 0)),
        "invalid safetensors header",
    );
    assert_contains(
        &open_err_with_weights(&st_file("{\"a\":", 0)),
        "invalid safetensors header",
    );

    // Offsets beyond the file; end before begin.
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
        8,
    ));
    assert_contains(&e, "tensor 'x'");
    assert_contains(&e, "run past the end");
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}}"#,
        8,
    ));
    assert_contains(&e, "run past the end");
    assert_contains(
        &open_err_with_weights(&st_file(
            r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#,
            8,
        )),
        "end is before begin",
    );

    // Byte length not matching the shape.
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"BF16","shape":[3],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert_contains(&e, "tensor 'x'");
    assert_contains(&e, "does not match shape [3]");

    // Absurd dims.
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert_contains(&e, "overflows");
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[1099511627776,65536],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert_contains(&e, "does not match shape");
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,8]}}"#,
        8,
    ));
    assert_contains(&e, "invalid safetensors header");

    // Duplicate tensor names in the header.
    let e = open_err_with_weights(&st_file(
        r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        8,
    ));
    assert_contains(&e, "duplicate tensor name 'x'");
}

#[test]
fn unsupported_dtype_is_named_when_asked_for() {
    let path = tmpdir();
    let p = path.path().join("x.safetensors");
    std::fs::write(
        &p,
        st_file(
            r#"{"q":{"dtype":"I8","shape":[2,2],"data_offsets":[0,4]},"f":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}"#,
            8,
        ),
    )
    .unwrap();
    let f = SafetensorsFile::open(&p).unwrap_or_else(|e| panic!("{e}"));
    assert!(f.has_tensor("q"));
    let e = err_of(f.tensor("q"));
    assert_contains(&e, "tensor 'q'");
    assert_contains(&e, "unsupported dtype I8");
    assert_contains(&e, "x.safetensors");
    let t = f.tensor("f").unwrap();
    let file_len = std::fs::metadata(&p).unwrap().len() as usize;
    // data_offsets [4, 8] of an 8-byte data buffer at the end of the file.
    assert_eq!(
        (t.dtype, t.offset, t.len),
        (SourceDType::F16, file_len - 4, 4)
    );
    assert_eq!(t.shape, vec![2]);
}

#[test]
fn hostile_directories_and_configs() {
    // A path that does not exist: an Io error naming it.
    let d = tmpdir();
    let missing = d.path().join("nope");
    let e = HfModel::open(&missing).unwrap_err();
    assert!(matches!(e, sparsellm::Error::Io { .. }), "{e}");
    assert_contains(&e.to_string(), "nope");

    // A directory without config.json.
    let e = HfModel::open(d.path()).unwrap_err();
    assert!(matches!(e, sparsellm::Error::Format { .. }), "{e}");
    assert_contains(&e.to_string(), "not a model directory (no config.json)");

    // config.json without weights.
    write_json(&d.path().join("config.json"), &tiny_config());
    assert_contains(
        &HfModel::open(d.path()).unwrap_err().to_string(),
        "no weights",
    );

    // Zero heads; kv heads not dividing heads; hidden not divisible without head_dim;
    // bad JSON; wrong types.
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"num_attention_heads": 0}),
            "num_attention_heads = 0",
        ),
        (
            serde_json::json!({"num_key_value_heads": 0}),
            "num_key_value_heads = 0",
        ),
        (
            serde_json::json!({"num_attention_heads": 3, "num_key_value_heads": 2}),
            "not a multiple of num_key_value_heads",
        ),
        (
            serde_json::json!({"num_attention_heads": 3, "head_dim": null}),
            "not a multiple of num_attention_heads",
        ),
        (
            serde_json::json!({"head_dim": 1099511627776u64}),
            "head_dim",
        ),
        (serde_json::json!({"hidden_size": -8}), "hidden_size"),
        (
            serde_json::json!({"num_hidden_layers": "two"}),
            "num_hidden_layers",
        ),
        (serde_json::json!({"eos_token_id": -1}), "eos_token_id"),
        (
            serde_json::json!({"attention_bias": true}),
            "attention_bias",
        ),
        (
            serde_json::json!({"quantization_config": {"quant_method": "gptq"}}),
            "quantiz",
        ),
    ];
    for (patch, want) in cases {
        let dd = tmpdir();
        tiny_single(dd.path());
        let mut c = tiny_config();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        write_json(&dd.path().join("config.json"), &c);
        let e = HfModel::open(dd.path()).unwrap_err().to_string();
        assert_contains(&e, want);
        assert_contains(&e, "config.json");
    }
    let dd = tmpdir();
    tiny_single(dd.path());
    std::fs::write(dd.path().join("config.json"), "{not json").unwrap();
    assert_contains(
        &HfModel::open(dd.path()).unwrap_err().to_string(),
        "invalid JSON",
    );

    // Untied but no lm_head: not a silent fallback.
    let dd = tmpdir();
    write_json(&dd.path().join("config.json"), &tiny_config());
    let t = tiny_tensors();
    let no_head: Vec<_> = t.iter().filter(|(n, _, _)| n != "lm_head.weight").collect();
    std::fs::write(dd.path().join("model.safetensors"), serialize(&no_head)).unwrap();
    let e = HfModel::open(dd.path()).unwrap_err().to_string();
    assert_contains(&e, "lm_head.weight");
    assert_contains(&e, "tie_word_embeddings = false");
}

#[test]
fn hostile_sharded_indexes() {
    let index_of = |dir: &Path| dir.join("model.safetensors.index.json");
    let patch_index = |dir: &Path, edit: &dyn Fn(&str) -> String| {
        let text = std::fs::read_to_string(index_of(dir)).unwrap();
        std::fs::write(index_of(dir), edit(&text)).unwrap();
    };

    // A missing shard file: an Io error naming it.
    let d = tmpdir();
    tiny_sharded(d.path());
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    assert_contains(
        &HfModel::open(d.path()).unwrap_err().to_string(),
        "model-00002-of-00002.safetensors",
    );

    // Shard paths leaving the directory.
    for bad in ["../model-00002-of-00002.safetensors", "/etc/passwd", ""] {
        let d = tmpdir();
        tiny_sharded(d.path());
        patch_index(d.path(), &|t| {
            t.replace("\"model-00002-of-00002.safetensors\"", &format!("{bad:?}"))
        });
        let e = HfModel::open(d.path()).unwrap_err().to_string();
        assert_contains(&e, "must be a relative path inside the model directory");
    }

    // Duplicate names in the weight_map.
    let d = tmpdir();
    tiny_sharded(d.path());
    patch_index(d.path(), &|t| {
        t.replacen(
            "\"weight_map\": {",
            "\"weight_map\": {\n\"model.norm.weight\": \"model-00002-of-00002.safetensors\",",
            1,
        )
    });
    assert_contains(
        &HfModel::open(d.path()).unwrap_err().to_string(),
        "duplicate key 'model.norm.weight'",
    );

    // The index names a shard that does not hold the tensor.
    let d = tmpdir();
    tiny_sharded(d.path());
    patch_index(d.path(), &|t| {
        t.replacen(
            "\"weight_map\": {",
            "\"weight_map\": {\n\"model.extra.weight\": \"model-00002-of-00002.safetensors\",",
            1,
        )
    });
    let e = HfModel::open(d.path()).unwrap_err().to_string();
    assert_contains(&e, "model.extra.weight");
    assert_contains(&e, "does not hold it");

    // A corrupt shard is reported against that shard.
    let d = tmpdir();
    tiny_sharded(d.path());
    std::fs::write(
        d.path().join("model-00001-of-00002.safetensors"),
        b"\x05\0\0\0\0\0\0\0{",
    )
    .unwrap();
    let e = HfModel::open(d.path()).unwrap_err().to_string();
    assert_contains(&e, "model-00001-of-00002.safetensors");
}
