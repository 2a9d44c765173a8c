//! Residual-stream hooks: the seam where the steering layer reads and changes activations.

use std::any::Any;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::ops::RangeInclusive;
use std::sync::Arc;

use ndarray::{ArrayViewMut3, Axis};

/// What a hook knows about one row of a batch.
#[derive(Clone, Default)]
pub struct RowContext {
    /// The caller's id for the sequence.
    pub id: u64,
    /// Per-row parameters for the hook (e.g. a steering strength), opaque to the runtime.
    pub params: Option<Arc<dyn Any + Send + Sync>>,
    /// The row's positions are generated tokens (decode steps), not its prompt: the engine
    /// sets it when the row starts generating.
    pub generating: bool,
}

impl std::fmt::Debug for RowContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowContext")
            .field("id", &self.id)
            .field("params", &self.params.is_some())
            .field("generating", &self.generating)
            .finish()
    }
}

impl RowContext {
    /// The row's parameters, if they are a `T`.
    pub fn params<T: Any>(&self) -> Option<&T> {
        self.params.as_deref().and_then(|p| p.downcast_ref())
    }
}

/// Called by the runtime between layer segments.
///
/// *When*: after each layer segment of every forward pass (prefill and each decode step), before
/// the next segment runs, on the engine thread. `layers` is the segment's inclusive layer range;
/// `residual` is its output, `[rows, new positions, hidden]`, and changes to it flow into the
/// next segment; `rows[i]` describes row `i`. A hook must not block: it runs inside the decode
/// loop of every sequence in the batch.
pub trait LayerHook: Send {
    /// Read or change the residual stream after `layers`.
    fn after_layers(
        &mut self,
        layers: RangeInclusive<usize>,
        residual: ArrayViewMut3<'_, f32>,
        rows: &[RowContext],
    );

    /// The first layer after which the hook changes `row`'s residual, if any. Early-exit gating
    /// uses it: when a gate decided after layer k gives the row parameters that change an
    /// earlier layer f ≤ k, the prefill resumes from f (layers before f keep their KV; the
    /// unsteered KV of the later layers is overwritten).
    fn first_modified_layer(&self, row: &RowContext) -> Option<usize>;

    /// A key for what the hook does to `row`'s *prompt* positions: rows with equal keys are
    /// changed alike, so the KV of a prompt prefix they share is the same and the prefix cache
    /// may keep it for the next such row ([`crate::PrefixCache`]). `None` (the default): the
    /// row's KV is its own and is never cached. Asked only for rows the hook modifies.
    fn prompt_key(&self, _row: &RowContext) -> Option<u64> {
        None
    }

    /// What the hook adds after `layer` to every new position of `row`, as `scale * vector`,
    /// where `layer` is inside a segment whose graph takes an addend there
    /// ([`crate::manifest::LayerInputs::addends`]) and `after_layers` cannot run. It must be the
    /// change `after_layers` would make at a boundary after `layer` (`x += scale * vector`), so
    /// that how an export is split never changes a row's output. `None` (the default): nothing.
    fn addend<'a>(&'a self, _layer: usize, _row: &'a RowContext) -> Option<(f32, &'a [f32])> {
        None
    }
}

/// Per-row strength for [`AddVectors`]: the row's residual gets `scale * vector[layer]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddScale(pub f32);

/// A row that brings its own vectors: the row's residual gets `scale * vectors[layer]` after
/// each layer it lists, whatever the hook holds. Requests under different policies (layers,
/// strength) or different steering packs — one replaced while others were in flight — share
/// one engine this way.
#[derive(Debug, Clone, PartialEq)]
pub struct AddOwnVectors {
    /// Scale of the vectors.
    pub scale: f32,
    /// Vector (hidden size) to add after each listed layer (0-based).
    pub vectors: Arc<BTreeMap<usize, Vec<f32>>>,
    /// Factor on `scale` at generated positions (1: every position alike, as in the paper; 0:
    /// the prompt only).
    pub generated_scale: f32,
}

/// Adds a vector per layer to every position of the rows whose parameters ask for it: an
/// [`AddScale`] row gets the hook's own vectors, an [`AddOwnVectors`] row its own — the
/// InferAligner intervention `x_l += alpha * g * theta_l`.
#[derive(Debug, Clone, Default)]
pub struct AddVectors {
    /// Vector to add after each listed layer (0-based), each of hidden size.
    pub vectors: BTreeMap<usize, Vec<f32>>,
}

impl LayerHook for AddVectors {
    fn after_layers(
        &mut self,
        layers: RangeInclusive<usize>,
        mut residual: ArrayViewMut3<'_, f32>,
        rows: &[RowContext],
    ) {
        // A layer group's graph exposes only its last layer's output; inner layers are steered
        // through the graph's addends (`addend`), or, without them, not at all (the sidecar
        // refuses such a policy at start-up).
        let layer = *layers.end();
        for (row, mut r) in rows.iter().zip(residual.axis_iter_mut(Axis(0))) {
            let Some((scale, vector)) = self.addend(layer, row) else {
                continue;
            };
            for mut position in r.axis_iter_mut(Axis(0)) {
                position.zip_mut_with(&ndarray::ArrayView1::from(vector), |x, &v| *x += scale * v);
            }
        }
    }

    fn addend<'a>(&'a self, layer: usize, row: &'a RowContext) -> Option<(f32, &'a [f32])> {
        let (scale, vector) = if let Some(&AddScale(scale)) = row.params::<AddScale>() {
            (scale, self.vectors.get(&layer))
        } else {
            let own = row.params::<AddOwnVectors>()?;
            let factor = if row.generating {
                own.generated_scale
            } else {
                1.0
            };
            (own.scale * factor, own.vectors.get(&layer))
        };
        vector.map(|v| (scale, v.as_slice()))
    }

    /// The scale and the vectors, bit for bit: the generated positions' factor is left out, it
    /// never touches a prompt.
    fn prompt_key(&self, row: &RowContext) -> Option<u64> {
        let (scale, vectors) = if let Some(&AddScale(scale)) = row.params::<AddScale>() {
            (scale, &self.vectors)
        } else {
            let own = row.params::<AddOwnVectors>()?;
            (own.scale, own.vectors.as_ref())
        };
        let mut h = std::hash::DefaultHasher::new();
        scale.to_bits().hash(&mut h);
        for (layer, vector) in vectors {
            layer.hash(&mut h);
            vector.iter().for_each(|x| x.to_bits().hash(&mut h));
        }
        Some(h.finish())
    }

    fn first_modified_layer(&self, row: &RowContext) -> Option<usize> {
        if row.params::<AddScale>().is_some() {
            return self.vectors.keys().next().copied();
        }
        row.params::<AddOwnVectors>()?
            .vectors
            .keys()
            .next()
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(params: impl Any + Send + Sync) -> RowContext {
        RowContext {
            params: Some(Arc::new(params)),
            ..RowContext::default()
        }
    }

    #[test]
    fn rows_steered_alike_share_a_prompt_key() {
        let vectors = BTreeMap::from([(1, vec![0.5, -1.0]), (3, vec![2.0, 0.25])]);
        let hook = AddVectors {
            vectors: vectors.clone(),
        };
        let own = |scale, generated_scale| AddOwnVectors {
            scale,
            vectors: Arc::new(vectors.clone()),
            generated_scale,
        };
        let key = |r: RowContext| hook.prompt_key(&r);
        let base = key(row(AddScale(3.0)));
        assert!(base.is_some());
        assert_eq!(
            key(row(own(3.0, 1.0))),
            base,
            "the same vectors, the same scale"
        );
        assert_eq!(
            key(row(own(3.0, 0.0))),
            base,
            "generated positions are not the prompt"
        );
        assert_ne!(key(row(AddScale(3.75))), base);
        let mut other = own(3.0, 1.0);
        Arc::make_mut(&mut other.vectors).insert(2, vec![0.0, 1.0]);
        assert_ne!(key(row(other)), base);
        assert_eq!(key(RowContext::default()), None);
    }
}
