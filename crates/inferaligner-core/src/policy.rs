//! Policies: what a gate decision leads to.

use std::sync::Arc;

use ndarray::ArrayView1;
use serde::{Deserialize, Serialize};

use crate::gate::Gate;

/// What to do with a request the gate calls harmful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    /// InferAligner: generate with the safety steering vectors added.
    #[default]
    Steer,
    /// Answer with the configured refusal (the paper's InferAligner_SIMPLE).
    Block,
    /// Answer normally and only report the decision.
    Monitor,
    /// No gating at all.
    Off,
}

impl PolicyMode {
    /// The mode's name, as in config (`steer`, `block`, `monitor`, `off`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Steer => "steer",
            Self::Block => "block",
            Self::Monitor => "monitor",
            Self::Off => "off",
        }
    }
}

/// What to do when gating itself fails (a model error, a timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Serve the request unguarded (availability first).
    FailOpen,
    /// Refuse the request (safety first).
    #[default]
    FailClosed,
}

/// What a policy does with raw-text completions (`/v1/completions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawCompletions {
    /// Gate them like chats: the gate reads the pack's view of the raw text (with a
    /// `last-user-turn` pack, the text as a user's request, or the last user turn it spells).
    #[default]
    Gate,
    /// Refuse them with 403: clients must use the chat endpoint.
    Refuse,
}

/// What becomes of a steered answer (the judge that reads it is the binary's `refusal` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteeredAnswers {
    /// Sent as the steered model writes it.
    AsGenerated,
    /// Held back until one of its first two sentences refuses (then the answer ends with that
    /// sentence) or it is clear none does (then it goes on as generated).
    StopAtRefusal,
    /// Like `stop-at-refusal`, but an answer that does not refuse within its first two
    /// sentences is replaced by the policy's `refusal` (the fallback; counted). The default:
    /// a user gets a short refusal either way, never the confused ramble steering can produce.
    #[default]
    RefusalOrFallback,
}

impl std::fmt::Display for SteeredAnswers {
    /// The setting's name, as config files and the command line spell it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AsGenerated => "as-generated",
            Self::StopAtRefusal => "stop-at-refusal",
            Self::RefusalOrFallback => "refusal-or-fallback",
        })
    }
}

/// How a steered answer held by `stop-at-refusal` or `refusal-or-fallback` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteeredEnding {
    /// Its first sentence refused: the answer is that sentence.
    Refusal,
    /// It did not refuse and was replaced by the policy's refusal.
    Fallback,
    /// It did not refuse and went on as generated.
    AsGenerated,
}

impl SteeredEnding {
    /// Stable label (metrics, spans).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refusal => "refusal",
            Self::Fallback => "fallback",
            Self::AsGenerated => "as-generated",
        }
    }
}

/// A named steering policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// What a harmful decision leads to.
    pub mode: PolicyMode,
    /// Steering strength; `None` takes the pack's default.
    pub alpha: Option<f32>,
    /// Steered layers; `None` takes the pack's default.
    pub layers: Option<Vec<usize>>,
    /// Factor on alpha at generated positions: 1 steers every position alike (the paper), 0
    /// the prompt only; 0.5 by default.
    pub generated_scale: f32,
    /// Added to the gate score: positive is stricter (more requests count as harmful).
    pub offset: f32,
    /// The answer of `block`.
    pub refusal: String,
    /// Behaviour when gating fails.
    pub on_error: OnError,
    /// What raw-text completions get.
    pub raw_completions: RawCompletions,
    /// The gate reads the request's system and developer messages too (each alone; the highest
    /// score decides). Off for an operator whose own system prompt the gate misreads and that
    /// clients cannot set.
    pub gate_system_prompts: bool,
    /// What becomes of a steered answer.
    pub steered_answers: SteeredAnswers,
    /// When the answer guard of `steered_answers` does not keep a steered answer's opening as
    /// a refusal, steer the request again at these factors on alpha, in turn, before the
    /// fallback (or the answer as generated). Empty: no retries.
    pub retry_scales: Vec<f32>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            mode: PolicyMode::Steer,
            alpha: None,
            layers: None,
            // measured on `shared/data` harmful_train (docs/aligned-sibling.md): half-strength
            // steering of the generated tokens halves the loops of full strength
            generated_scale: 0.5,
            offset: 0.0,
            refusal: "I'm sorry, but I can't help with that request.".into(),
            on_error: OnError::FailClosed,
            raw_completions: RawCompletions::Gate,
            gate_system_prompts: true,
            steered_answers: SteeredAnswers::default(),
            // measured on `shared/data` harmful_train 61-260 (docs/aligned-sibling.md): steered
            // SmolLM2 refuses in its own words at one strength where it did not at another
            retry_scales: vec![1.25, 0.75, 1.5],
        }
    }
}

impl Policy {
    /// The gate views this policy reads of `views`, whose last `context_views` read the
    /// request's system and developer messages.
    pub fn gate_views(&self, mut views: Vec<Vec<u32>>, context_views: usize) -> Vec<Vec<u32>> {
        if !self.gate_system_prompts {
            views.truncate(views.len().saturating_sub(context_views));
        }
        views
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Served as is (harmless, or `monitor`/`off`).
    Pass,
    /// Generated with steering.
    Steer,
    /// Answered with the refusal.
    Block,
}

impl Action {
    /// Stable label for headers, metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Steer => "steer",
            Self::Block => "block",
        }
    }
}

/// A gate decision under a policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the gate called the request harmful.
    pub harmful: bool,
    /// `a · s + b` (the threshold is `-offset`).
    pub score: f64,
    /// What to do.
    pub action: Action,
}

impl Policy {
    /// This policy for a request the sidecar cannot steer (an answer that must be JSON, may be
    /// a tool call, or reports log-probabilities the policy's held answers could not have):
    /// one that would steer blocks instead, its answer the refusal.
    pub fn without_steering(self: Arc<Self>) -> Arc<Self> {
        if self.mode == PolicyMode::Steer {
            Arc::new(Self {
                mode: PolicyMode::Block,
                ..(*self).clone()
            })
        } else {
            self
        }
    }

    /// Decide for the last prompt token's residual at the gate layer.
    pub fn decide(&self, gate: &Gate, activation: ArrayView1<'_, f32>) -> Decision {
        let score = gate.score(activation);
        let harmful = self.mode != PolicyMode::Off && score + f64::from(self.offset) > 0.0;
        let action = match (harmful, self.mode) {
            (false, _) | (true, PolicyMode::Monitor | PolicyMode::Off) => Action::Pass,
            (true, PolicyMode::Steer) => Action::Steer,
            (true, PolicyMode::Block) => Action::Block,
        };
        Decision {
            harmful,
            score,
            action,
        }
    }

    /// The action when gating failed.
    pub fn on_failure(&self) -> Action {
        match self.on_error {
            OnError::FailOpen => Action::Pass,
            OnError::FailClosed => Action::Block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> Gate {
        Gate {
            layer: 0,
            direction: vec![1.0, 0.0],
            bias: -1.0,
        }
    }

    #[test]
    fn steered_answers_display_as_configs_spell_them() {
        for mode in [
            SteeredAnswers::AsGenerated,
            SteeredAnswers::StopAtRefusal,
            SteeredAnswers::RefusalOrFallback,
        ] {
            let spelled = serde_json::to_value(mode).expect("serialises");
            assert_eq!(spelled.as_str(), Some(mode.to_string().as_str()));
        }
        assert_eq!(
            Policy::default().steered_answers,
            SteeredAnswers::RefusalOrFallback
        );
    }

    #[test]
    fn modes_map_decisions_to_actions() {
        let harmful = ndarray::arr1(&[3.0f32, 0.0]);
        let harmless = ndarray::arr1(&[0.0f32, 0.0]);
        for (mode, want) in [
            (PolicyMode::Steer, Action::Steer),
            (PolicyMode::Block, Action::Block),
            (PolicyMode::Monitor, Action::Pass),
            (PolicyMode::Off, Action::Pass),
        ] {
            let p = Policy {
                mode,
                ..Policy::default()
            };
            assert_eq!(p.decide(&gate(), harmful.view()).action, want, "{mode:?}");
            assert_eq!(p.decide(&gate(), harmless.view()).action, Action::Pass);
        }
        let off = Policy {
            mode: PolicyMode::Off,
            ..Policy::default()
        };
        assert!(!off.decide(&gate(), harmful.view()).harmful);
    }

    #[test]
    fn offset_moves_the_threshold_and_errors_follow_on_error() {
        let borderline = ndarray::arr1(&[0.8f32, 0.0]); // score -0.2
        let strict = Policy {
            offset: 0.5,
            ..Policy::default()
        };
        assert!(strict.decide(&gate(), borderline.view()).harmful);
        assert!(!Policy::default().decide(&gate(), borderline.view()).harmful);
        assert_eq!(Policy::default().on_failure(), Action::Block);
        let open = Policy {
            on_error: OnError::FailOpen,
            ..Policy::default()
        };
        assert_eq!(open.on_failure(), Action::Pass);
    }
}
