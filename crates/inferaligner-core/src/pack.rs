//! Steering packs: one `.safetensors` file holding everything InferAligner needs for one target
//! model — the target's safety related vectors and biases (the gate), the safety steering
//! vectors, and metadata saying how they were made and for which model.
//!
//! Tensors: `target_srv [L, H]`, `ssv [L, H]`, `bias [L]`, `gate_direction [H]` (`[2H]` for the
//! `last-and-mean` readout), `gate_bias [1]`
//! (all float32). Metadata: one JSON document under the key `inferaligner` ([`PackMetadata`]).

use std::collections::HashMap;
use std::path::Path;

use ndarray::{Array1, Array2, ArrayView1};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::gate::{Gate, GateEstimator, GateReadout, GateView};
use crate::{CoreError, Result};

/// The pack format this code reads and writes.
pub const PACK_FORMAT: &str = "inferaligner.steering/v1";
const METADATA_KEY: &str = "inferaligner";

/// Identifies a model export, so a pack is only used with the model it was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFingerprint {
    /// Human-readable name (from the export's source).
    pub name: String,
    /// Residual-stream width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// sha256 of the export's `manifest.json` (which records every segment's sha256).
    pub manifest_sha256: String,
    /// sha256 of what the export computes, however it is split into segments: its source
    /// checkpoint, element type, weight storage, tokenizer and chat template. Packs that record
    /// it serve every export of that model (plain or fused graphs, any segments); packs made
    /// before it existed are held to `manifest_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
}

impl ModelFingerprint {
    /// Whether `other` computes what this one does: the same model identity when both record
    /// one, else the same manifest.
    pub fn same_model(&self, other: &ModelFingerprint) -> bool {
        let same = match (&self.model_sha256, &other.model_sha256) {
            (Some(a), Some(b)) => a == b,
            _ => self.manifest_sha256 == other.manifest_sha256,
        };
        same && self.hidden_size == other.hidden_size && self.num_layers == other.num_layers
    }

    /// The hash `same_model` compares, shortened for messages.
    fn short_id(&self) -> String {
        match &self.model_sha256 {
            Some(id) => format!("model {}", short(id)),
            None => format!("manifest {}", short(&self.manifest_sha256)),
        }
    }
}

/// Where the safety steering vectors come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SsvSource {
    /// The SRVs of an aligned sibling model (the paper's cross-model guidance).
    Aligned,
    /// Refusal-prefill minus compliance-prefill residuals on the source model.
    Contrastive,
    /// The target's residuals over the tokens of a refusal that follows a harmful request,
    /// minus those over its own answer to it (mean over the answer positions): the direction
    /// from what it says to a refusal, where it says it.
    RefusalAnswers,
}

/// One calibration prompt set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CalibrationSet {
    /// Where the prompts came from (a file name or `builtin`).
    pub name: String,
    /// Number of prompts.
    pub size: usize,
    /// sha256 of the prompts (one per line, UTF-8, in order).
    pub sha256: String,
}

/// Everything about a pack except its tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackMetadata {
    /// [`PACK_FORMAT`].
    pub format: String,
    /// How vectors are applied: `add`.
    pub operation: String,
    /// Where: `decoder_block_output` (the residual stream after a whole decoder layer).
    pub hook_site: String,
    /// `0-based` layer indices.
    pub layer_numbering: String,
    /// Which positions are steered: `all` (every prompt and generated token).
    pub positions: String,
    /// The model the pack gates and steers.
    pub target: ModelFingerprint,
    /// The model the SSVs were read from (the target itself for `contrastive`).
    pub source: ModelFingerprint,
    /// How the SSVs were made.
    pub ssv_source: SsvSource,
    /// How the gate was fitted.
    pub gate_estimator: GateEstimator,
    /// Harmful calibration prompts.
    pub harmful_set: CalibrationSet,
    /// Harmless calibration prompts.
    pub harmless_set: CalibrationSet,
    /// Cross-validated balanced accuracy of the gate at each layer.
    pub layer_accuracy: Vec<f64>,
    /// The layer the gate reads.
    pub gate_layer: usize,
    /// Which tokens the gate reads; the gate was fitted on them. Absent in packs made before
    /// views existed: `prompt`.
    #[serde(default)]
    pub gate_view: GateView,
    /// How the gate pools the residuals of the tokens it reads. Absent in packs made before
    /// readouts existed: `last-token`.
    #[serde(default)]
    pub gate_readout: GateReadout,
    /// Default steering strength (absolute L2 norm added per layer).
    pub default_alpha: f32,
    /// Default steered layers (L_G).
    pub steered_layers: Vec<usize>,
}

impl PackMetadata {
    /// Metadata with the fixed fields of this format filled in.
    pub fn new(target: ModelFingerprint, source: ModelFingerprint, ssv_source: SsvSource) -> Self {
        Self {
            format: PACK_FORMAT.into(),
            operation: "add".into(),
            hook_site: "decoder_block_output".into(),
            layer_numbering: "0-based".into(),
            positions: "all".into(),
            target,
            source,
            ssv_source,
            gate_estimator: GateEstimator::MeanDiff,
            harmful_set: CalibrationSet {
                name: String::new(),
                size: 0,
                sha256: String::new(),
            },
            harmless_set: CalibrationSet {
                name: String::new(),
                size: 0,
                sha256: String::new(),
            },
            layer_accuracy: Vec::new(),
            gate_layer: 0,
            gate_view: GateView::Prompt,
            gate_readout: GateReadout::LastToken,
            default_alpha: 0.0,
            steered_layers: Vec::new(),
        }
    }
}

/// A steering pack in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct SteeringPack {
    /// What the pack is and was made from.
    pub metadata: PackMetadata,
    /// The target model's SRV per layer, `[layers, hidden]`, unit rows.
    pub target_srv: Array2<f32>,
    /// The safety steering vector per layer, `[layers, hidden]`, unit rows.
    pub ssv: Array2<f32>,
    /// The mean-diff gate bias per layer, `[layers]`.
    pub bias: Array1<f32>,
    /// The fitted gate at the gate layer (for `probe`, not the SRV).
    pub gate_direction: Array1<f32>,
    /// The fitted gate's bias.
    pub gate_bias: f32,
}

fn pack_error(message: impl Into<String>) -> CoreError {
    CoreError::Pack(message.into())
}

impl SteeringPack {
    /// The gate this pack defines.
    pub fn gate(&self) -> Gate {
        Gate {
            layer: self.metadata.gate_layer,
            direction: self.gate_direction.to_vec(),
            bias: self.gate_bias,
        }
    }

    /// The SSV of one layer.
    pub fn ssv(&self, layer: usize) -> Option<ArrayView1<'_, f32>> {
        (layer < self.ssv.nrows()).then(|| self.ssv.row(layer))
    }

    /// Internal consistency: format, shapes, layer indices, finite values.
    pub fn validate(&self) -> Result<()> {
        let m = &self.metadata;
        if m.format != PACK_FORMAT {
            return Err(pack_error(format!(
                "unknown pack format {:?} (this build reads {PACK_FORMAT:?})",
                m.format
            )));
        }
        if m.operation != "add" || m.hook_site != "decoder_block_output" || m.positions != "all" {
            return Err(pack_error(format!(
                "unsupported intervention: operation {:?} at {:?} on {:?} positions",
                m.operation, m.hook_site, m.positions
            )));
        }
        let (layers, hidden) = (m.target.num_layers, m.target.hidden_size);
        let shapes_ok = self.target_srv.dim() == (layers, hidden)
            && self.ssv.dim() == (layers, hidden)
            && self.bias.len() == layers
            && self.gate_direction.len() == m.gate_readout.width(hidden)
            && m.layer_accuracy.len() == layers;
        if !shapes_ok {
            return Err(pack_error(format!(
                "tensor shapes do not match a {layers}-layer, {hidden}-wide target"
            )));
        }
        if m.source.hidden_size != hidden || m.source.num_layers != layers {
            return Err(pack_error(
                "the SSV source model has another shape than the target",
            ));
        }
        if m.gate_layer >= layers || m.steered_layers.iter().any(|&l| l >= layers) {
            return Err(pack_error(format!(
                "gate layer {} or steered layers {:?} outside 0..{layers}",
                m.gate_layer, m.steered_layers
            )));
        }
        let finite = self
            .target_srv
            .iter()
            .chain(self.ssv.iter())
            .chain(self.bias.iter())
            .chain(self.gate_direction.iter())
            .chain(std::iter::once(&self.gate_bias))
            .chain(std::iter::once(&m.default_alpha))
            .all(|v| v.is_finite());
        if !finite {
            return Err(pack_error("NaN or infinite values"));
        }
        Ok(())
    }

    /// Refuse to be used with a model other than the one the pack was made for.
    pub fn check_target(&self, model: &ModelFingerprint) -> Result<()> {
        let t = &self.metadata.target;
        if !t.same_model(model) {
            return Err(CoreError::WrongModel(format!(
                "the pack was made for {} ({} layers, hidden {}, {}), but the loaded \
                 model is {} ({} layers, hidden {}, {}); calibrate a pack for this model",
                t.name,
                t.num_layers,
                t.hidden_size,
                t.short_id(),
                model.name,
                model.num_layers,
                model.hidden_size,
                model.short_id()
            )));
        }
        Ok(())
    }

    /// Serialise to safetensors bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let metadata = serde_json::to_string(&self.metadata)
            .map_err(|e| pack_error(format!("metadata: {e}")))?;
        let gate_bias = [self.gate_bias];
        let tensors: Vec<(&str, Vec<usize>, Vec<u8>)> = vec![
            ("bias", vec![self.bias.len()], le_bytes(self.bias.iter())),
            ("gate_bias", vec![1], le_bytes(gate_bias.iter())),
            (
                "gate_direction",
                vec![self.gate_direction.len()],
                le_bytes(self.gate_direction.iter()),
            ),
            ("ssv", self.ssv.shape().to_vec(), le_bytes(self.ssv.iter())),
            (
                "target_srv",
                self.target_srv.shape().to_vec(),
                le_bytes(self.target_srv.iter()),
            ),
        ];
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                TensorView::new(Dtype::F32, shape.clone(), data)
                    .map(|v| (*name, v))
                    .map_err(|e| pack_error(e.to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize(
            views,
            Some(HashMap::from([(METADATA_KEY.into(), metadata)])),
        )
        .map_err(|e| pack_error(e.to_string()))
    }

    /// Parse and validate safetensors bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| pack_error(format!("not a safetensors file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes)
            .map_err(|e| pack_error(format!("not a safetensors file: {e}")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| pack_error("no inferaligner metadata: not a steering pack"))?;
        // Check the format before the rest, so a future version gets a clear message.
        let format = serde_json::from_str::<serde_json::Value>(json)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_str().map(str::to_owned)))
            .unwrap_or_default();
        if format != PACK_FORMAT {
            return Err(pack_error(format!(
                "unknown pack format {format:?} (this build reads {PACK_FORMAT:?})"
            )));
        }
        let metadata: PackMetadata =
            serde_json::from_str(json).map_err(|e| pack_error(format!("metadata: {e}")))?;
        let matrix = |name: &str| -> Result<Array2<f32>> {
            let (shape, data) = read_f32(&st, name)?;
            match shape[..] {
                [rows, cols] => Array2::from_shape_vec((rows, cols), data)
                    .map_err(|e| pack_error(format!("{name}: {e}"))),
                _ => Err(pack_error(format!(
                    "{name}: expected 2 dimensions, got {shape:?}"
                ))),
            }
        };
        let vector = |name: &str| -> Result<Array1<f32>> {
            let (shape, data) = read_f32(&st, name)?;
            if shape.len() != 1 {
                return Err(pack_error(format!(
                    "{name}: expected 1 dimension, got {shape:?}"
                )));
            }
            Ok(Array1::from(data))
        };
        let gate_bias = vector("gate_bias")?;
        let pack = Self {
            metadata,
            target_srv: matrix("target_srv")?,
            ssv: matrix("ssv")?,
            bias: vector("bias")?,
            gate_direction: vector("gate_direction")?,
            gate_bias: *gate_bias
                .first()
                .ok_or_else(|| pack_error("gate_bias is empty"))?,
        };
        pack.validate()?;
        Ok(pack)
    }

    /// Write the pack to a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Read a pack file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|e| match e {
            CoreError::Pack(m) => CoreError::Pack(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn le_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

fn read_f32(st: &SafeTensors<'_>, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let view = st
        .tensor(name)
        .map_err(|_| pack_error(format!("missing tensor {name:?}")))?;
    if view.dtype() != Dtype::F32 {
        return Err(pack_error(format!(
            "{name}: dtype {:?}, expected F32",
            view.dtype()
        )));
    }
    let data = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((view.shape().to_vec(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(hash: &str) -> ModelFingerprint {
        ModelFingerprint {
            name: "tiny".into(),
            hidden_size: 4,
            num_layers: 3,
            manifest_sha256: hash.into(),
            model_sha256: None,
        }
    }

    fn pack() -> SteeringPack {
        let mut metadata =
            PackMetadata::new(fingerprint("aa"), fingerprint("aa"), SsvSource::Contrastive);
        metadata.layer_accuracy = vec![0.5, 0.9, 0.8];
        metadata.gate_layer = 1;
        metadata.steered_layers = vec![0, 1];
        metadata.default_alpha = 4.0;
        let unit = |l: usize, j: usize| if j == l { 1.0 } else { 0.0 };
        SteeringPack {
            metadata,
            target_srv: Array2::from_shape_fn((3, 4), |(l, j)| unit(l, j)),
            ssv: Array2::from_shape_fn((3, 4), |(l, j)| unit(l + 1, j)),
            bias: Array1::from(vec![-0.5, 0.25, 1.0]),
            gate_direction: Array1::from(vec![0.0, 1.0, 0.0, 0.0]),
            gate_bias: 0.25,
        }
    }

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack.safetensors");
        pack().save(&path).unwrap();
        let back = SteeringPack::load(&path).unwrap();
        assert_eq!(back, pack());
        assert_eq!(back.gate().layer, 1);
        assert_eq!(back.ssv(2).unwrap().to_vec(), vec![0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn packs_made_before_readouts_read_the_last_token() {
        let mut json = serde_json::to_value(&pack().metadata).unwrap();
        json.as_object_mut().unwrap().remove("gate_readout");
        let old: PackMetadata = serde_json::from_value(json).unwrap();
        assert_eq!(old.gate_readout, GateReadout::LastToken);
    }

    #[test]
    fn a_last_and_mean_gate_is_twice_as_wide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack.safetensors");
        let mut p = pack();
        p.metadata.gate_readout = GateReadout::LastAndMean;
        assert!(p.save(&path).is_err(), "a 4-wide gate for a 2 x 4 readout");
        p.gate_direction = Array1::from(vec![0.0, 1.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]);
        p.save(&path).unwrap();
        assert_eq!(SteeringPack::load(&path).unwrap(), p);
    }

    #[test]
    fn a_pack_for_another_model_is_refused() {
        let p = pack();
        assert!(p.check_target(&fingerprint("aa")).is_ok());
        let err = p.check_target(&fingerprint("bb")).unwrap_err();
        assert_eq!(err.kind(), "wrong_model");
        assert!(
            err.to_string().contains("calibrate a pack for this model"),
            "{err}"
        );
        let wider = ModelFingerprint {
            hidden_size: 8,
            ..fingerprint("aa")
        };
        assert!(p.check_target(&wider).is_err());
    }

    #[test]
    fn a_pack_with_a_model_identity_serves_every_export_of_that_model() {
        let with_id = |manifest: &str, id: &str| ModelFingerprint {
            model_sha256: Some(id.into()),
            ..fingerprint(manifest)
        };
        let mut p = pack();
        p.metadata.target = with_id("aa", "m1");
        let p = SteeringPack::from_bytes(&p.to_bytes().unwrap()).unwrap();
        // another segmentation or graph variant: another manifest, the same model
        assert!(p.check_target(&with_id("cc", "m1")).is_ok());
        let err = p.check_target(&with_id("aa", "m2")).unwrap_err();
        assert!(err.to_string().contains("model m2"), "{err}");
        // an export that records no identity falls back to the manifest
        assert!(p.check_target(&fingerprint("aa")).is_ok());
        assert!(p.check_target(&fingerprint("cc")).is_err());
        // and a pack made before identities existed is held to its manifest
        assert!(pack().check_target(&with_id("aa", "m1")).is_ok());
        assert!(pack().check_target(&with_id("cc", "m1")).is_err());
    }

    #[test]
    fn unknown_formats_and_broken_packs_are_clear_errors() {
        let mut future = pack();
        future.metadata.format = "inferaligner.steering/v9".into();
        // A file written by a future version: the same bytes with the format tag changed.
        let mut bytes = pack().to_bytes().unwrap();
        let tag = b"steering/v1";
        let at = bytes.windows(tag.len()).position(|w| w == tag).unwrap();
        bytes[at + tag.len() - 1] = b'9';
        let err = SteeringPack::from_bytes(&bytes).unwrap_err();
        assert!(err.to_string().contains("unknown pack format"), "{err}");
        assert!(future.to_bytes().is_err());

        assert!(SteeringPack::from_bytes(b"not a pack").is_err());
        let good = pack().to_bytes().unwrap();
        assert!(SteeringPack::from_bytes(&good[..good.len() - 8]).is_err());

        let mut bad_layer = pack();
        bad_layer.metadata.steered_layers = vec![7];
        assert!(
            bad_layer
                .to_bytes()
                .unwrap_err()
                .to_string()
                .contains("outside")
        );
        let mut nan = pack();
        nan.ssv[[0, 0]] = f32::NAN;
        assert!(nan.to_bytes().is_err());
    }

    proptest::proptest! {
        // Fuzzing the loader (the toolchain has no nightly for cargo-fuzz): arbitrary bytes,
        // and valid files with bytes flipped or cut, load or fail with an error, never panic.
        #[test]
        fn the_loader_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = SteeringPack::from_bytes(&bytes);
        }

        #[test]
        fn the_loader_never_panics_on_damaged_packs(
            flips in proptest::collection::vec((proptest::num::usize::ANY, proptest::num::u8::ANY), 1..8),
            cut in proptest::option::of(proptest::num::usize::ANY),
        ) {
            let mut bytes = pack().to_bytes().unwrap();
            for (at, value) in flips {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            if let Ok(loaded) = SteeringPack::from_bytes(&bytes) {
                // whatever loads is internally consistent
                proptest::prop_assert_eq!(loaded.ssv.ncols(), loaded.metadata.target.hidden_size);
                proptest::prop_assert!(loaded.metadata.gate_layer < loaded.metadata.target.num_layers);
            }
        }
    }
}
