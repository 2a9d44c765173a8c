//! `manifest.json` of a layer-split export: what the exporter wrote, checked before use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Result, RuntimeError};

/// The manifest format this runtime reads.
pub const MANIFEST_FORMAT: &str = "inferaligner.export/v1";

/// A parsed and validated `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format tag; must equal [`MANIFEST_FORMAT`].
    pub format: String,
    /// HF model type: `llama`, `mistral` or `qwen2`.
    pub architecture: String,
    /// Element type of the residual stream and KV cache: `float32` or `float16`.
    pub dtype: String,
    /// How the weights are stored: `float32`, `float16` or `int4-block32` (MatMulNBits).
    #[serde(default)]
    pub weights: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Decoder layer count.
    pub num_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Rows of the LM head.
    pub vocab_size: usize,
    /// Longest sequence (prompt + completion) the graphs compute exactly.
    pub context_length: usize,
    /// Segments in execution order: embed, layer groups, head.
    pub segments: Vec<Segment>,
    /// Tokenizer file and special token ids.
    pub tokenizer: TokenizerInfo,
    /// Chat template file (Jinja), if the model has one.
    pub chat_template: Option<String>,
    /// Where the weights came from (format, name, sha256).
    pub source: serde_json::Value,
    /// RoPE inverse frequencies, `head_dim / 2` of them: the fused variant's cos/sin tables
    /// are built from them.
    #[serde(default)]
    pub rope_inv_freq: Vec<f32>,
    /// The file this manifest was read from (not serialised).
    #[serde(skip)]
    pub path: PathBuf,
}

/// One ONNX graph of the export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// A manifest holds a few dozen segments, read once: their size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Segment {
    /// `input_ids` → residual stream.
    Embed(EmbedSegment),
    /// A contiguous group of decoder layers.
    Layers(LayerSegment),
    /// Final norm and LM head → logits.
    Head(HeadSegment),
}

impl Segment {
    /// The graph file, relative to the export directory.
    pub fn file(&self) -> &str {
        match self {
            Self::Embed(s) => &s.file,
            Self::Layers(s) => &s.file,
            Self::Head(s) => &s.file,
        }
    }

    fn sha256(&self) -> &str {
        match self {
            Self::Embed(s) => &s.sha256,
            Self::Layers(s) => &s.sha256,
            Self::Head(s) => &s.sha256,
        }
    }

    fn weights(&self) -> &ExternalData {
        match self {
            Self::Embed(s) => &s.weights,
            Self::Layers(s) => &s.weights,
            Self::Head(s) => &s.weights,
        }
    }
}

/// A graph's weights in a file beside it (ONNX external data, which ONNX Runtime maps instead
/// of copying): the exporter writes them so; graphs that hold their weights name none.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExternalData {
    /// The weights' file, relative to the export directory.
    #[serde(
        default,
        rename = "external_data",
        skip_serializing_if = "Option::is_none"
    )]
    pub file: Option<String>,
    /// Its sha256 (exports of before it was recorded have none, and are not checked).
    #[serde(
        default,
        rename = "external_data_sha256",
        skip_serializing_if = "Option::is_none"
    )]
    pub sha256: Option<String>,
}

/// Tensor names of a single-input, single-output segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedSegment {
    /// Graph file.
    pub file: String,
    /// sha256 of the graph file.
    pub sha256: String,
    /// Its weights' file, when they are beside it.
    #[serde(flatten)]
    pub weights: ExternalData,
    /// `input_ids` tensor name.
    pub inputs: EmbedInputs,
    /// `hidden_states` tensor name.
    pub outputs: HiddenOutput,
}

/// Inputs of the embedding graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbedInputs {
    /// `[batch, seq]` int64 token ids.
    pub input_ids: String,
}

/// A graph output that is the residual stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HiddenOutput {
    /// `[batch, seq, hidden]`.
    pub hidden_states: String,
}

/// A group of decoder layers `layers[0]..=layers[1]` in one graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSegment {
    /// Graph file.
    pub file: String,
    /// sha256 of the graph file.
    pub sha256: String,
    /// Its weights' file, when they are beside it.
    #[serde(flatten)]
    pub weights: ExternalData,
    /// First and last layer (inclusive, 0-based).
    pub layers: [usize; 2],
    /// Graph variant: `plain` (standard ONNX operators only) or `fused` (ONNX Runtime's
    /// GroupQueryAttention and skip-norm contrib ops; CPU, float32).
    pub variant: String,
    /// Input tensor names.
    pub inputs: LayerInputs,
    /// Output tensor names.
    pub outputs: LayerOutputs,
}

impl LayerSegment {
    /// Number of decoder layers in this segment.
    pub fn len(&self) -> usize {
        self.layers[1] + 1 - self.layers[0]
    }

    /// Whether the segment holds no layer (never true for a validated manifest).
    pub fn is_empty(&self) -> bool {
        self.layers[1] < self.layers[0]
    }
}

/// Input names of a layer group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerInputs {
    /// Residual stream in, `[batch, seq, hidden]`.
    pub hidden_states: String,
    /// Where the new tokens sit and what they attend to, by variant.
    #[serde(flatten)]
    pub positions: PositionInputs,
    /// Per layer, `[batch, kv_heads, past, head_dim]`.
    pub past_key: Vec<String>,
    /// Per layer, `[batch, kv_heads, past, head_dim]`.
    pub past_value: Vec<String>,
    /// Inner layers of the group (never its last) whose output takes an addend, by layer:
    /// `[batch, 1, hidden]`, added to every new position of the row after that layer, so a
    /// hook can steer there without a segment boundary ([`crate::LayerHook::addend`]).
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "layer_keys"
    )]
    pub addends: BTreeMap<usize, String>,
}

/// A JSON object keyed by layer numbers (JSON keys are strings; the manifest is parsed through
/// a `serde_json::Value`, which does not read them as numbers).
fn layer_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<BTreeMap<usize, String>, D::Error> {
    BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .map(|(k, v)| match k.parse() {
            Ok(layer) => Ok((layer, v)),
            Err(_) => Err(serde::de::Error::custom(format!("{k:?} is not a layer"))),
        })
        .collect()
}

/// How a layer graph learns the new tokens' positions and the cache slots they attend to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PositionInputs {
    /// The fused variant: GroupQueryAttention's inputs. The past is the whole KV buffer; row
    /// `b` holds `seqlens_k[b] + 1 - seq` cached tokens.
    Fused {
        /// `[batch]` int32: the row's cached tokens + seq − 1.
        seqlens_k: String,
        /// int32 scalar: the longest row's cached tokens + seq.
        total_sequence_length: String,
        /// `[≥ total, head_dim / 2]` float32 RoPE tables.
        cos_cache: String,
        /// Same shape as `cos_cache`.
        sin_cache: String,
    },
    /// The plain variant.
    Plain {
        /// `[batch, seq]` int64 positions.
        position_ids: String,
        /// `[batch, past + seq]` int64, 1 for the slots to attend to (cached and new).
        attention_mask: String,
    },
}

/// Output names of a layer group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerOutputs {
    /// Residual stream out, `[batch, seq, hidden]`.
    pub hidden_states: String,
    /// Per layer: the new positions' keys, `[batch, kv_heads, seq, head_dim]` (plain), or the
    /// whole buffer with them written in (fused, the past's shape).
    pub present_key: Vec<String>,
    /// Per layer, like `present_key`.
    pub present_value: Vec<String>,
}

/// The final norm and LM head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadSegment {
    /// Graph file.
    pub file: String,
    /// sha256 of the graph file.
    pub sha256: String,
    /// Its weights' file, when they are beside it.
    #[serde(flatten)]
    pub weights: ExternalData,
    /// Residual stream in.
    pub inputs: HiddenOutput,
    /// Logits out.
    pub outputs: LogitsOutput,
}

/// Output of the head graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogitsOutput {
    /// `[batch, seq, vocab]` float32.
    pub logits: String,
}

/// Tokenizer file and special tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `tokenizer.json`, relative to the export directory.
    pub file: String,
    /// sha256 of the tokenizer file.
    pub sha256: String,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// Ids that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Id used to pad batches.
    pub pad_token_id: Option<u32>,
    /// Whether encoding prepends BOS.
    pub add_bos_token: bool,
    /// BOS text, for chat templates.
    pub bos_token: Option<String>,
    /// EOS text, for chat templates.
    pub eos_token: Option<String>,
}

impl Manifest {
    /// Read `dir/manifest.json` and validate it against the files beside it (including their
    /// sha256 digests, so a segment from another export is caught before it is run).
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|source| RuntimeError::Io {
            path: path.clone(),
            source,
        })?;
        let invalid = |message: String| RuntimeError::Manifest {
            path: path.clone(),
            message,
        };
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        // A variant this runtime does not know has other inputs (see the exporter); say so
        // plainly instead of failing on a missing tensor name.
        let variants = raw["segments"].as_array().into_iter().flatten();
        if let Some(other) = variants
            .filter_map(|s| s.get("variant").and_then(|v| v.as_str()))
            .find(|v| !matches!(*v, "plain" | "fused"))
        {
            return Err(invalid(format!(
                "layer variant {other:?} is not supported by this runtime; export with \
                 --variant plain or fused"
            )));
        }
        let mut manifest: Manifest =
            serde_json::from_value(raw).map_err(|e| invalid(e.to_string()))?;
        manifest.path = path;
        manifest.validate()?;
        manifest.verify_files()?;
        Ok(manifest)
    }

    /// Bytes of K and V one token takes in the cache, all layers together (float32).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_key_value_heads * self.head_dim * std::mem::size_of::<f32>()
    }

    /// The identity steering packs are checked against: shape, the sha256 of `manifest.json`
    /// (which records every segment's and the tokenizer's sha256) and [`Self::model_sha256`].
    pub fn fingerprint(&self) -> Result<inferaligner_core::ModelFingerprint> {
        Ok(inferaligner_core::ModelFingerprint {
            name: self
                .source
                .get("name")
                .and_then(|v| v.as_str())
                .unwrap_or("unnamed")
                .to_owned(),
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            manifest_sha256: sha256_file(&self.path)?,
            model_sha256: self.model_sha256()?,
        })
    }

    /// sha256 of what the export computes, not of how it is split: the source checkpoint's
    /// sha256, the element type, the weight storage, the tokenizer and the chat template. The
    /// plain and fused graphs of float weights compute the same residual stream (to rounding),
    /// so they share it; quantized graphs add their variant, because the two variants quantize
    /// different weight layouts. `None` when the source records no sha256.
    pub fn model_sha256(&self) -> Result<Option<String>> {
        let Some(source) = self.source.get("sha256").and_then(|v| v.as_str()) else {
            return Ok(None);
        };
        let template = match &self.chat_template {
            Some(file) => sha256_file(&self.dir().join(file))?,
            None => String::new(),
        };
        let weights = self.weight_storage();
        let mut variants: Vec<&str> = Vec::new();
        if weights != self.dtype {
            variants = self.layer_segments().map(|l| l.variant.as_str()).collect();
            variants.sort_unstable();
            variants.dedup();
        }
        let identity = serde_json::json!({
            "source": source,
            "dtype": self.dtype,
            "weights": weights,
            "variants": variants,
            "tokenizer": self.tokenizer.sha256,
            "chat_template": template,
        });
        Ok(Some(hex::encode(Sha256::digest(
            inferaligner_core::canonical_json(&identity),
        ))))
    }

    /// How the weights are stored; manifests written before the field say nothing, and their
    /// weights are stored as `dtype`.
    pub fn weight_storage(&self) -> &str {
        if self.weights.is_empty() {
            &self.dtype
        } else {
            &self.weights
        }
    }

    /// The directory holding the manifest and its files.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// The layer range of the segment holding `layer`, when the residual stream after `layer`
    /// is not graph output (the layer is inside a multi-layer segment): a gate cannot read
    /// there, and a hook acts there only through the graph's addend ([`Self::takes_addend`]).
    pub fn inside_segment(&self, layer: usize) -> Option<[usize; 2]> {
        self.layer_segments()
            .map(|l| l.layers)
            .find(|[first, last]| (*first..*last).contains(&layer))
    }

    /// Whether the graph holding `layer` inside it takes an addend after that layer.
    pub fn takes_addend(&self, layer: usize) -> bool {
        self.layer_segments()
            .any(|l| l.inputs.addends.contains_key(&layer))
    }

    /// The decoder layer segments, in order.
    pub fn layer_segments(&self) -> impl Iterator<Item = &LayerSegment> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Layers(l) => Some(l),
            _ => None,
        })
    }

    fn invalid(&self, message: impl Into<String>) -> RuntimeError {
        RuntimeError::Manifest {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Structural checks that need no file access.
    pub fn validate(&self) -> Result<()> {
        if self.format != MANIFEST_FORMAT {
            return Err(self.invalid(format!(
                "format {:?} is not {MANIFEST_FORMAT:?} (export with a matching inferaligner-onnx)",
                self.format
            )));
        }
        if !matches!(self.dtype.as_str(), "float32" | "float16") {
            return Err(self.invalid(format!("unsupported dtype {:?}", self.dtype)));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(
                self.invalid("num_attention_heads is not a multiple of num_key_value_heads")
            );
        }
        let (first, rest) = self
            .segments
            .split_first()
            .ok_or_else(|| self.invalid("no segments"))?;
        let (last, middle) = rest
            .split_last()
            .ok_or_else(|| self.invalid("needs embed, layer and head segments"))?;
        if !matches!(first, Segment::Embed(_)) || !matches!(last, Segment::Head(_)) {
            return Err(self.invalid("segments must start with embed and end with head"));
        }
        let mut next_layer = 0;
        for seg in middle {
            let Segment::Layers(l) = seg else {
                return Err(self.invalid("embed/head segments may only come first/last"));
            };
            if l.layers[0] != next_layer || l.is_empty() {
                return Err(self.invalid(format!(
                    "{}: covers layers {:?}, expected to start at layer {next_layer}",
                    l.file, l.layers
                )));
            }
            let fused = matches!(l.inputs.positions, PositionInputs::Fused { .. });
            if fused != (l.variant == "fused") {
                return Err(self.invalid(format!(
                    "{}: variant {:?} with the other variant's inputs",
                    l.file, l.variant
                )));
            }
            if fused && self.rope_inv_freq.len() * 2 != self.head_dim {
                return Err(self.invalid(format!(
                    "{}: the fused variant needs rope_inv_freq ({} values for head_dim {})",
                    l.file,
                    self.rope_inv_freq.len(),
                    self.head_dim
                )));
            }
            let n = l.len();
            let names = [
                l.inputs.past_key.len(),
                l.inputs.past_value.len(),
                l.outputs.present_key.len(),
                l.outputs.present_value.len(),
            ];
            if names.iter().any(|&k| k != n) {
                return Err(self.invalid(format!(
                    "{}: {n} layers but KV tensor name lists of lengths {names:?}",
                    l.file
                )));
            }
            if let Some(layer) = l
                .inputs
                .addends
                .keys()
                .find(|&&k| !(l.layers[0]..l.layers[1]).contains(&k))
            {
                return Err(self.invalid(format!(
                    "{}: an addend after layer {layer}, which is not an inner layer of {:?}",
                    l.file, l.layers
                )));
            }
            next_layer = l.layers[1] + 1;
        }
        if next_layer != self.num_layers {
            return Err(self.invalid(format!(
                "segments cover {next_layer} layers, the model has {}",
                self.num_layers
            )));
        }
        Ok(())
    }

    /// Every referenced file exists and has the recorded sha256.
    fn verify_files(&self) -> Result<()> {
        let weights = self.segments.iter().filter_map(|s| {
            let w = s.weights();
            Some((w.file.as_deref()?, w.sha256.as_deref()))
        });
        let files = self
            .segments
            .iter()
            .map(|s| (s.file(), Some(s.sha256())))
            .chain(weights)
            .chain(std::iter::once((
                self.tokenizer.file.as_str(),
                Some(self.tokenizer.sha256.as_str()),
            )));
        for (file, expected) in files {
            let path = self.dir().join(file);
            let Some(expected) = expected else {
                // there at least
                std::fs::metadata(&path).map_err(|source| RuntimeError::Io {
                    path: path.clone(),
                    source,
                })?;
                continue;
            };
            let actual = sha256_file(&path)?;
            if actual != expected {
                return Err(RuntimeError::HashMismatch {
                    path,
                    expected: expected.to_owned(),
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// Streamed sha256 of a file, as lowercase hex.
fn sha256_file(path: &Path) -> Result<String> {
    let io_err = |source| RuntimeError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err)?;
    Ok(hex::encode(hasher.finalize()))
}
