//! Safety related vectors and the activations they are computed from.

use ndarray::{Array1, ArrayView1, ArrayView2, Axis};

use crate::{CoreError, Result};

/// Last-token residuals of one layer for the two calibration classes, `[prompts, hidden]`.
#[derive(Debug, Clone, Copy)]
pub struct ClassActivations<'a> {
    /// Residuals of harmful prompts.
    pub harmful: ArrayView2<'a, f32>,
    /// Residuals of harmless prompts.
    pub harmless: ArrayView2<'a, f32>,
}

impl<'a> ClassActivations<'a> {
    /// Check both classes are non-empty, finite and of the same width.
    pub fn validate(&self) -> Result<usize> {
        let (nh, hh) = self.harmful.dim();
        let (ns, hs) = self.harmless.dim();
        if nh == 0 || ns == 0 {
            return Err(CoreError::Empty(
                "both harmful and harmless activations are needed".into(),
            ));
        }
        if hh != hs || hh == 0 {
            return Err(CoreError::Shape(format!(
                "harmful activations are {hh} wide, harmless {hs}"
            )));
        }
        if self
            .harmful
            .iter()
            .chain(self.harmless.iter())
            .any(|v| !v.is_finite())
        {
            return Err(CoreError::NonFinite(
                "activations contain NaN or infinity".into(),
            ));
        }
        Ok(hh)
    }
}

/// Column means in f64 (stable for thousands of prompts).
pub(crate) fn mean_rows(x: ArrayView2<'_, f32>) -> Array1<f64> {
    x.mapv(f64::from)
        .mean_axis(Axis(0))
        .expect("validated non-empty")
}

/// The safety related vector of one layer: mean harmful residual minus mean harmless residual,
/// L2-normalised. It points from harmless toward harmful.
pub fn safety_related_vector(acts: ClassActivations<'_>) -> Result<Vec<f32>> {
    acts.validate()?;
    let diff = mean_rows(acts.harmful) - mean_rows(acts.harmless);
    normalized(diff.view())
}

/// `v / |v|`, refusing a zero vector (the classes have the same mean: no direction exists).
pub fn normalized(v: ArrayView1<'_, f64>) -> Result<Vec<f32>> {
    let norm = v.dot(&v).sqrt();
    if !norm.is_finite() || norm <= f64::EPSILON {
        return Err(CoreError::Degenerate(
            "the two classes have the same mean activation: no direction".into(),
        ));
    }
    Ok(v.iter().map(|x| (x / norm) as f32).collect())
}

/// The `contrastive` steering vector: mean residual after a refusal prefill minus after a
/// compliance prefill (same prompts), L2-normalised.
pub fn contrastive_vector(
    refusal: ArrayView2<'_, f32>,
    compliance: ArrayView2<'_, f32>,
) -> Result<Vec<f32>> {
    safety_related_vector(ClassActivations {
        harmful: refusal,
        harmless: compliance,
    })
}

/// `v` without its component along the unit vector `direction`, L2-normalised.
///
/// For aligned steering vectors on a small sibling: a short safety fine-tune leaves the
/// sibling's harmful−harmless direction mostly what the target already has (cosine 0.85–0.95
/// with the target's own SRV on SmolLM2), and that shared part encodes *what is asked*, which
/// the target ignores. What the fine-tune added (the refusal) is the part orthogonal to it.
pub fn orthogonalized(v: &[f32], direction: &[f32]) -> Result<Vec<f32>> {
    let along = project(ArrayView1::from(v), direction);
    let rest: Array1<f64> = v
        .iter()
        .zip(direction)
        .map(|(&a, &d)| f64::from(a) - along * f64::from(d))
        .collect();
    normalized(rest.view())
}

/// Dot product of an activation with a direction, in f64.
pub fn project(activation: ArrayView1<'_, f32>, direction: &[f32]) -> f64 {
    activation
        .iter()
        .zip(direction)
        .map(|(&a, &d)| f64::from(a) * f64::from(d))
        .sum()
}
/// The layers steered by default: from 2/5 to 2/3 of the depth (12–20 of SmolLM2's 30), the
/// middle layers where the paper found steering effective and the gate's own read (later) is
/// not disturbed.
pub fn default_steered_layers(num_layers: usize) -> Vec<usize> {
    let first = num_layers * 2 / 5;
    (first..=(num_layers * 2 / 3).max(first)).collect()
}

/// The default steering strength: `fraction` of the mean L2 norm of the residuals at the
/// steered layers (`residuals[layer]` holds one row per prompt). The residual stream's scale
/// differs by orders of magnitude between models, so alpha is relative to it.
pub fn default_alpha(fraction: f32, residuals: &[ArrayView2<'_, f32>]) -> Result<f32> {
    let norms: Vec<f32> = residuals
        .iter()
        .flat_map(|rows| rows.outer_iter().map(|r| r.dot(&r).sqrt()))
        .collect();
    if norms.is_empty() {
        return Err(CoreError::Empty(
            "no residuals at the steered layers".into(),
        ));
    }
    Ok(fraction * norms.iter().sum::<f32>() / norms.len() as f32)
}
