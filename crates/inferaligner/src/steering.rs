//! The one glue between a steering pack, a policy and the runtime's early-exit gate. `serve`,
//! `eval` and `generate` all submit the engine request this builds, so the figures `eval`
//! prints come from the path that answers users: the same decision, the same vectors (carried
//! by the row, `AddOwnVectors`), the same alpha and layer fallbacks, and a blocked request
//! that ends after the gate.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use inferaligner_core::{Action, Policy, SteeringPack};
use inferaligner_proxy::GateReport;
use inferaligner_runtime::{
    AddOwnVectors, AddVectors, AfterGate, EarlyExit, LayerHook, Manifest, RowContext,
};

/// A pack checked against the loaded model, and the policy that uses it.
#[derive(Debug, Clone)]
pub struct Steering {
    /// The pack.
    pub pack: Arc<SteeringPack>,
    /// The policy.
    pub policy: Arc<Policy>,
}

impl Steering {
    /// Load a pack and refuse it unless it was made for `manifest`'s model and has the
    /// policy's layers.
    pub fn load(path: &Path, manifest: &Manifest, policy: Policy) -> anyhow::Result<Self> {
        let pack = SteeringPack::load(path)
            .with_context(|| format!("loading the steering pack {}", path.display()))?;
        pack.check_target(&manifest.fingerprint()?)
            .with_context(|| format!("steering pack {}", path.display()))?;
        let steering = Self {
            pack: Arc::new(pack),
            policy: Arc::new(policy),
        };
        steering.check_layers(manifest.num_layers)?;
        Ok(steering)
    }

    /// Every steered layer must have a vector in the pack.
    pub fn check_layers(&self, num_layers: usize) -> anyhow::Result<()> {
        if let Some(bad) = self.layers().iter().find(|&&l| self.pack.ssv(l).is_none()) {
            bail!("steered layer {bad} does not exist in this {num_layers}-layer model");
        }
        Ok(())
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

    /// The early-exit gate of one request, reading `view` (or the prompt when `None`; see
    /// [`crate::view`]). `report` gets the decision first. A steered row
    /// carries its own vectors; a blocked request ends after the gate (its answer is the
    /// policy's refusal), and so does one that passes when `end_unless_steered` (proxy mode:
    /// the upstream answers it).
    pub fn gate(
        &self,
        view: Option<Vec<u32>>,
        end_unless_steered: bool,
        report: impl FnOnce(GateReport) + Send + 'static,
    ) -> EarlyExit {
        let pack = self.pack.clone();
        let policy = self.policy.clone();
        let (alpha, layers) = (self.alpha(), self.layers());
        let generated_scale = self.policy.generated_scale;
        let layer = pack.metadata.gate_layer;
        EarlyExit {
            after_layer: layer,
            view,
            decide: Box::new(move |residual: &[f32]| {
                let decision = policy.decide(&pack.gate(), ndarray::ArrayView1::from(residual));
                report(GateReport {
                    decision,
                    layer,
                    alpha,
                    layers: layers.clone(),
                });
                match decision.action {
                    Action::Steer => {
                        let vectors = layers
                            .iter()
                            .filter_map(|&l| pack.ssv(l).map(|v| (l, v.to_vec())))
                            .collect();
                        AfterGate::Generate(RowContext {
                            params: Some(Arc::new(AddOwnVectors {
                                scale: alpha,
                                vectors: Arc::new(vectors),
                                generated_scale,
                            })),
                            ..RowContext::default()
                        })
                    }
                    Action::Pass if !end_unless_steered => {
                        AfterGate::Generate(RowContext::default())
                    }
                    Action::Pass | Action::Block => AfterGate::End,
                }
            }),
        }
    }
}

/// The hook every engine runs: steered rows bring their own vectors, so requests under
/// different policies or packs share one engine.
pub fn hook() -> Box<dyn LayerHook> {
    Box::new(AddVectors::default())
}
