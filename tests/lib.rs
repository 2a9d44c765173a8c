//! Shared helpers for the end-to-end tests: fixture paths and golden values.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod sidecar;

/// `tests/fixtures/<name>` in this workspace.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The seeded tiny Llama exported by `make fixture`.
pub fn tiny_llama() -> PathBuf {
    fixture("tiny-llama")
}

/// The same weights exported as the fused variant (GroupQueryAttention); same golden values.
pub fn tiny_llama_fused() -> PathBuf {
    fixture("tiny-llama-fused")
}

/// The same weights as two graphs (layers 0-2 and 3) whose inner layers (0 and 1) take
/// addends: steering inside a graph, where the fixture pack steers (1, 2) and gates (2). Same
/// golden values.
pub fn tiny_llama_addends() -> PathBuf {
    fixture("tiny-llama-addends")
}

/// [`tiny_llama_addends`] as the fused variant.
pub fn tiny_llama_fused_addends() -> PathBuf {
    fixture("tiny-llama-fused-addends")
}

/// Its "aligned sibling": the same shape and tokenizer, another seed.
pub fn tiny_llama_aligned() -> PathBuf {
    fixture("tiny-llama-aligned")
}

/// `golden.json` written beside a fixture by the numpy reference.
#[derive(Debug, Deserialize)]
pub struct Golden {
    /// Seed the fixture was generated with.
    pub seed: u64,
    /// One entry per prompt.
    pub cases: Vec<GoldenCase>,
}

/// Golden values for one chat prompt.
#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    /// The user message.
    pub question: String,
    /// The rendered chat prompt.
    pub prompt: String,
    /// Its token ids.
    pub input_ids: Vec<i64>,
    /// Logits of the last prompt position.
    pub last_logits: Vec<f32>,
    /// Last-position residual: embeddings, then the output of each layer.
    pub last_residuals: Vec<Vec<f32>>,
    /// Greedy continuation (fixed length, no EOS stop).
    pub greedy_ids: Vec<u32>,
}

/// Read `golden.json` of a fixture directory.
pub fn golden(dir: &Path) -> Golden {
    let text = std::fs::read_to_string(dir.join("golden.json")).expect("fixture has golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The tiny fixture, on one ONNX Runtime thread (the tests run in parallel).
pub fn tiny_model() -> inferaligner_runtime::LayerSplitModel {
    fixture_model(&tiny_llama())
}

/// A fixture export, on one ONNX Runtime thread.
pub fn fixture_model(dir: &Path) -> inferaligner_runtime::LayerSplitModel {
    let options = inferaligner_runtime::SessionOptions {
        intra_op_threads: 1,
        ..inferaligner_runtime::SessionOptions::default()
    };
    inferaligner_runtime::LayerSplitModel::load(dir, &options).expect("fixture loads")
}

/// A hook adding one fixed vector (a sawtooth of `period`, centred on zero) after layers 1 and
/// 3 of the fixture's 4.
pub fn sawtooth_hook(hidden: usize, period: usize) -> inferaligner_runtime::AddVectors {
    let half = (period / 2) as f32;
    let vector: Vec<f32> = (0..hidden)
        .map(|i| ((i % period) as f32 - half) / half)
        .collect();
    inferaligner_runtime::AddVectors {
        vectors: std::collections::BTreeMap::from([(1, vector.clone()), (3, vector)]),
    }
}

/// A row the hook steers with `scale`.
pub fn steered_row(scale: f32) -> inferaligner_runtime::RowContext {
    inferaligner_runtime::RowContext {
        params: Some(std::sync::Arc::new(inferaligner_runtime::AddScale(scale))),
        ..inferaligner_runtime::RowContext::default()
    }
}

/// Greedy generation of exactly `max_new_tokens` tokens (EOS ignored).
pub fn greedy(max_new_tokens: usize) -> inferaligner_runtime::GenerationParams {
    inferaligner_runtime::GenerationParams {
        max_new_tokens,
        ignore_eos: true,
        ..inferaligner_runtime::GenerationParams::default()
    }
}

/// The token ids among a request's events.
pub fn tokens(events: &[inferaligner_runtime::GenerationEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            inferaligner_runtime::GenerationEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}
