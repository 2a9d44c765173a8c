//! Gated steering from a pack: the glue between the core's gate and policy and the runtime's
//! early-exit gate and vector-adding hook.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use inferaligner_core::{Action, Decision, Policy, SteeringPack};
use inferaligner_runtime::{AddScale, AddVectors, Gate, GateVerdict, Manifest, RowContext};

/// A pack checked against the loaded model, and the policy that uses it.
#[derive(Debug, Clone)]
pub struct Steering {
    /// The pack.
    pub pack: Arc<SteeringPack>,
    /// The policy.
    pub policy: Policy,
}

impl Steering {
    /// Load a pack and refuse it unless it was made for `manifest`'s model.
    pub fn load(path: &Path, manifest: &Manifest, policy: Policy) -> anyhow::Result<Self> {
        let pack = SteeringPack::load(path)?;
        pack.check_target(&manifest.fingerprint()?)
            .with_context(|| format!("steering pack {}", path.display()))?;
        let steering = Self {
            pack: Arc::new(pack),
            policy,
        };
        let layers = steering.layers();
        if let Some(bad) = layers.iter().find(|&&l| l >= manifest.num_layers) {
            bail!(
                "steered layer {bad} does not exist in this {}-layer model",
                manifest.num_layers
            );
        }
        Ok(steering)
    }

    /// Steering strength: the policy's, else the pack's default.
    pub fn alpha(&self) -> f32 {
        self.policy
            .alpha
            .unwrap_or(self.pack.metadata.default_alpha)
    }

    /// Steered layers: the policy's, else the pack's default.
    pub fn layers(&self) -> Vec<usize> {
        self.policy
            .layers
            .clone()
            .unwrap_or_else(|| self.pack.metadata.steered_layers.clone())
    }

    /// The hook adding the SSVs (unit norm) at the steered layers; rows opt in with their scale.
    pub fn hook(&self) -> AddVectors {
        AddVectors {
            vectors: self
                .layers()
                .into_iter()
                .filter_map(|l| self.pack.ssv(l).map(|v| (l, v.to_vec())))
                .collect(),
        }
    }

    /// An early-exit gate for one request: the decision goes to `report`, and a row the policy
    /// steers gets `alpha` as its scale.
    pub fn gate(&self, report: impl FnOnce(Decision) + Send + 'static) -> Gate {
        let pack = self.pack.clone();
        let policy = self.policy.clone();
        let alpha = self.alpha();
        Gate {
            after_layer: pack.metadata.gate_layer,
            decide: Box::new(move |residual: &[f32]| {
                let decision = policy.decide(&pack.gate(), ndarray::ArrayView1::from(residual));
                report(decision);
                GateVerdict::Generate(match decision.action {
                    Action::Steer => RowContext {
                        id: 0,
                        params: Some(Arc::new(AddScale(alpha))),
                    },
                    Action::Pass | Action::Block => RowContext::default(),
                })
            }),
        }
    }
}
