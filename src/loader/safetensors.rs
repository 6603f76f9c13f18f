//! One `.safetensors` file: memory-maps it, parses and checks its header, and hands out
//! [`RawTensor`] views of its tensors.
//!
//! Format: an 8-byte little-endian header length `N`, `N` bytes of JSON
//! (`{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//! "__metadata__": {..}}`), then the data buffer; offsets are relative to the start of the
//! data buffer. The header is parsed here rather than by the `safetensors` crate so that
//! every failure names the file and tensor, duplicate names are caught, and tensors of
//! dtypes we cannot compute on are still listed (asking for one is the error).
//!
//! Every length and offset is checked with overflow-safe arithmetic before any slicing:
//! each tensor's bytes lie inside the file and their length equals `numel * dtype size`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};

use crate::error::{Error, Result};
use crate::loader::{RawTensor, SourceDType, map_file};

/// Largest header accepted (the `safetensors` crate uses the same cap). Real headers are
/// well under a megabyte; the cap stops a hostile length from driving a huge parse.
pub const MAX_HEADER_SIZE: u64 = 100_000_000;

/// Size of the little-endian header-length prefix.
const LEN_PREFIX: usize = 8;

/// A tensor's storage type as written in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorDType {
    /// A dtype the engine computes with (F32, F16, BF16).
    Supported(SourceDType),
    /// Any other dtype (I8, F64, F8_E4M3, or a name we do not know): listed, but asking
    /// for the tensor is an "unsupported dtype" error.
    Unsupported(String),
}

impl TensorDType {
    fn parse(s: &str) -> TensorDType {
        match s {
            "F32" => TensorDType::Supported(SourceDType::F32),
            "F16" => TensorDType::Supported(SourceDType::F16),
            "BF16" => TensorDType::Supported(SourceDType::BF16),
            other => TensorDType::Unsupported(other.to_string()),
        }
    }

    /// Bits per element, when the dtype is one the safetensors format defines.
    fn bits(&self) -> Option<u64> {
        match self {
            TensorDType::Supported(d) => Some(d.block().1 as u64 * 8 / d.block().0 as u64),
            TensorDType::Unsupported(s) => match s.as_str() {
                "F4" => Some(4),
                "F6_E2M3" | "F6_E3M2" => Some(6),
                "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
                | "F8_E5M2FNUZ" => Some(8),
                "I16" | "U16" => Some(16),
                "I32" | "U32" => Some(32),
                "C64" | "F64" | "I64" | "U64" => Some(64),
                _ => None,
            },
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TensorDType::Supported(d) => d.name(),
            TensorDType::Unsupported(s) => s,
        }
    }
}

/// One tensor as listed in the header, after checking. `offset` is absolute in the file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
}

/// An opened, checked safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, TensorEntry>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Memory-maps `path` and checks its header and every tensor's bounds.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let map = map_file(path)?;
        Self::from_map(path, map)
    }

    /// Parses an already mapped file; `path` is used in error messages.
    pub fn from_map(path: &Path, map: Arc<Mmap>) -> Result<SafetensorsFile> {
        let (tensors, metadata) = parse(path, &map)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's `__metadata__` (string values only; others are skipped).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every tensor listed in the header, by name, whatever its dtype.
    pub fn entries(&self) -> &BTreeMap<String, TensorEntry> {
        &self.tensors
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A view of tensor `name`; an error naming file and tensor if it is absent or of a
    /// dtype the engine cannot compute on.
    pub fn tensor(&self, name: &str) -> Result<RawTensor> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "not found in this file"))?;
        let dtype = match &e.dtype {
            TensorDType::Supported(d) => *d,
            TensorDType::Unsupported(s) => {
                return Err(Error::tensor(
                    &self.path,
                    name,
                    format!("unsupported dtype {s} (supported: F32, F16, BF16)"),
                ));
            }
        };
        Ok(RawTensor {
            name: name.to_string(),
            dtype,
            shape: e.shape.clone(),
            map: Arc::clone(&self.map),
            offset: e.offset,
            len: e.len,
            path: self.path.clone(),
        })
    }
}

/// A tensor's header entry as written.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// The header object: tensors and `__metadata__`, refusing duplicate keys (serde_json
/// would otherwise keep the last one silently).
struct Header {
    tensors: Vec<(String, RawEntry)>,
    metadata: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for Header {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Header;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Header, A::Error> {
                let mut seen = HashSet::new();
                let mut h = Header {
                    tensors: Vec::new(),
                    metadata: BTreeMap::new(),
                };
                while let Some(key) = m.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate tensor name '{key}'")));
                    }
                    if key == "__metadata__" {
                        let md: Option<BTreeMap<String, serde_json::Value>> = m.next_value()?;
                        h.metadata = md
                            .unwrap_or_default()
                            .into_iter()
                            .filter_map(|(k, v)| match v {
                                serde_json::Value::String(s) => Some((k, s)),
                                _ => None,
                            })
                            .collect();
                    } else {
                        let entry: RawEntry = m
                            .next_value()
                            .map_err(|e| de::Error::custom(format!("tensor '{key}': {e}")))?;
                        h.tensors.push((key, entry));
                    }
                }
                Ok(h)
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object read in order, refusing duplicate keys. Used for an index's `weight_map`.
pub(crate) struct UniqueMap<V>(pub Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(key) = m.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format!("duplicate key '{key}'")));
                    }
                    let v = m.next_value()?;
                    out.push((key, v));
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

type Parsed = (BTreeMap<String, TensorEntry>, BTreeMap<String, String>);

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let file_len = buf.len() as u64;
    let fmt_err = |msg: String| Error::format(path, msg);
    let prefix: [u8; LEN_PREFIX] = buf
        .get(..LEN_PREFIX)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            fmt_err(format!(
                "not a safetensors file: {file_len} bytes, too short for the 8-byte header length"
            ))
        })?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER_SIZE {
        return Err(fmt_err(format!(
            "safetensors header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit (corrupt or not a safetensors file)"
        )));
    }
    let header_end = (LEN_PREFIX as u64)
        .checked_add(n)
        .filter(|&e| e <= file_len)
        .ok_or_else(|| {
            fmt_err(format!(
                "truncated: header length {n} runs past the end of the {file_len}-byte file"
            ))
        })?;
    // header_end <= file_len, which fits in usize because the file is mapped.
    let header_end = header_end as usize;
    let header_bytes = &buf[LEN_PREFIX..header_end];
    if header_bytes.first() != Some(&b'{') {
        return Err(fmt_err(
            "invalid safetensors header: it does not start with '{'".into(),
        ));
    }
    let header: Header = serde_json::from_slice(header_bytes)
        .map_err(|e| fmt_err(format!("invalid safetensors header: {e}")))?;

    let data_len = file_len - header_end as u64;
    let mut tensors = BTreeMap::new();
    for (name, raw) in header.tensors {
        let entry = check_entry(path, &name, raw, header_end as u64, data_len)?;
        tensors.insert(name, entry);
    }
    Ok((tensors, header.metadata))
}

/// Checks one header entry against the file: shape product and byte length without
/// overflow, offsets ordered and inside the data buffer, length equal to what the shape
/// and dtype need.
fn check_entry(
    path: &Path,
    name: &str,
    raw: RawEntry,
    data_start: u64,
    data_len: u64,
) -> Result<TensorEntry> {
    let err = |msg: String| Error::tensor(path, name, msg);
    let dtype = TensorDType::parse(&raw.dtype);
    let (begin, end) = raw.data_offsets;
    if end < begin {
        return Err(err(format!(
            "data_offsets [{begin}, {end}]: end is before begin"
        )));
    }
    if end > data_len {
        return Err(err(format!(
            "data_offsets [{begin}, {end}] run past the end of the data ({data_len} bytes; file truncated?)"
        )));
    }
    let len = end - begin;
    let numel = raw
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("shape {:?}: element count overflows", raw.shape)))?;
    if let Some(bits) = dtype.bits() {
        let want_bits = numel
            .checked_mul(bits)
            .ok_or_else(|| err(format!("shape {:?}: byte size overflows", raw.shape)))?;
        if !want_bits.is_multiple_of(8) || want_bits / 8 != len {
            return Err(err(format!(
                "byte length {len} does not match shape {:?} of dtype {} ({} bits)",
                raw.shape,
                dtype.name(),
                want_bits
            )));
        }
    }
    // All of these are bounded by the file length, so they fit in usize; shape dims are
    // bounded by numel <= len (or are zero-sized), and are converted checked anyway.
    let shape = raw
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| err(format!("shape {:?} does not fit in memory", raw.shape)))?;
    let offset = data_start
        .checked_add(begin)
        .and_then(|o| usize::try_from(o).ok())
        .ok_or_else(|| err("offset overflows".into()))?;
    let len = usize::try_from(len).map_err(|_| err("length overflows".into()))?;
    Ok(TensorEntry {
        dtype,
        shape,
        offset,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_a_small_header() {
        let buf = file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]},"__metadata__":{"format":"pt"}}"#,
            &[0u8; 11],
        );
        let (t, md) = parse(Path::new("x"), &buf).unwrap();
        assert_eq!(md.get("format").map(String::as_str), Some("pt"));
        assert_eq!(t["a"].dtype, TensorDType::Supported(SourceDType::F32));
        assert_eq!(t["b"].dtype, TensorDType::Unsupported("I8".into()));
        assert_eq!(t["a"].offset, 8 + buf.len() - 8 - 11);
    }

    #[test]
    fn refuses_duplicates_and_mismatches() {
        let dup = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0u8; 4],
        );
        let e = parse(Path::new("x"), &dup).unwrap_err().to_string();
        assert!(e.contains("duplicate tensor name 'a'"), "{e}");
        let bad = file(
            r#"{"a":{"dtype":"F16","shape":[3],"data_offsets":[0,4]}}"#,
            &[0u8; 4],
        );
        let e = parse(Path::new("x"), &bad).unwrap_err().to_string();
        assert!(e.contains("does not match shape"), "{e}");
    }
}
