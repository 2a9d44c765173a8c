//! The guidance gate: `a · s + b + offset > 0` on the last prompt token's residual at one layer,
//! its two estimators, cross-validated accuracy and the choice of gate layer.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, concatenate};
use serde::{Deserialize, Serialize};

use crate::vectors::{ClassActivations, mean_rows, normalized, project, safety_related_vector};
use crate::{CoreError, Result};

/// How a gate's direction and bias are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateEstimator {
    /// The paper: direction = the target's safety related vector, bias at the midpoint of the two
    /// class-mean projections.
    #[default]
    MeanDiff,
    /// A class-balanced, L2-regularised logistic regression; its threshold is then set on a
    /// held-apart validation split for a target false-positive rate.
    Probe,
}

/// Which tokens the gate reads (the last one's residual at the gate layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateView {
    /// The whole rendered prompt: system prompt, earlier turns, pasted context and the last
    /// turn (the paper's reading; what packs made before views existed were fitted on).
    #[default]
    Prompt,
    /// The last user turn alone, rendered as a one-turn chat (a raw completion's text, or the
    /// last user turn a raw prompt embeds, likewise), its content cut to a head and a tail when
    /// long. A system prompt, a chat history or a pasted document before the request cannot
    /// dilute it, every endpoint is read the same way, and the gate's cost is bounded.
    LastUserTurn,
    /// As `last-user-turn`, and a chat turn of one block longer than a few sentences' worth of
    /// words is read once more as its last words alone; the gate takes the higher score. A
    /// long first-person request is often one run-on sentence whose ask comes last ("…and I
    /// still know where he parks, so tell me how to…"), and the mean over the whole turn reads
    /// the backstory (docs/evaluation.md).
    LastUserTurnAndTail,
}

/// How the gate turns the residuals of the tokens it reads into the one activation it scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateReadout {
    /// The last token's residual (the paper's reading; packs made before readouts existed).
    #[default]
    LastToken,
    /// The last token's residual followed by the mean residual over the request's own tokens
    /// (from the first token of the user turn's content, after the template's one-turn prefix
    /// when the tokens start with it, to the end): `2 × hidden` values. On SmolLM2 the mean
    /// separated bare requests in unseen wordings far better than the last token, but alone it
    /// reads a jailbreak wrapper or a pasted document rather than the request; with both, the
    /// probe does better than either on every framing of the tuning set (docs/evaluation.md).
    LastAndMean,
}

impl GateReadout {
    /// Values per activation, for a model of `hidden` dimensions.
    pub fn width(self, hidden: usize) -> usize {
        match self {
            Self::LastToken => hidden,
            Self::LastAndMean => 2 * hidden,
        }
    }
}

/// A fitted gate for one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// Layer (0-based) whose output residual the gate reads.
    pub layer: usize,
    /// Unit-norm direction (for `mean-diff`, the target's SRV).
    pub direction: Vec<f32>,
    /// Bias `b`: the gate fires when `a · direction + bias + offset > 0`.
    pub bias: f32,
}

impl Gate {
    /// `a · direction + bias` for an activation.
    pub fn score(&self, activation: ArrayView1<'_, f32>) -> f64 {
        project(activation, &self.direction) + f64::from(self.bias)
    }

    /// Whether the gate fires; a positive `offset` makes it stricter to pass (fires more).
    pub fn fires(&self, activation: ArrayView1<'_, f32>, offset: f32) -> bool {
        self.score(activation) + f64::from(offset) > 0.0
    }
}

/// Options of the `probe` estimator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbeOptions {
    /// L2 penalty on the (standardised) weights.
    pub l2: f64,
    /// Full-batch gradient steps.
    pub iterations: usize,
    /// Share of each class held apart to set the threshold.
    pub validation_share: f64,
    /// False-positive rate the threshold aims for on the held-apart harmless prompts.
    pub target_fpr: f64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            l2: 1e-2,
            iterations: 500,
            validation_share: 0.2,
            target_fpr: 0.02,
        }
    }
}

/// Fit the paper's gate: direction = SRV, bias = minus the midpoint of the class-mean
/// projections (on balanced sets: minus the mean projection of all calibration prompts).
pub fn fit_mean_diff(layer: usize, acts: ClassActivations<'_>) -> Result<Gate> {
    let direction = safety_related_vector(acts)?;
    let d = Array1::from(direction.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
    let mid = 0.5 * (mean_rows(acts.harmful).dot(&d) + mean_rows(acts.harmless).dot(&d));
    Ok(Gate {
        layer,
        direction,
        bias: -mid as f32,
    })
}

/// Fit the `probe` gate: logistic regression on standardised features with class-balanced
/// weights, trained on every harmful prompt and all but a validation share of the harmless
/// ones; the bias is then placed so that at most `target_fpr` of the held-apart harmless prompts
/// fire. Deterministic (no randomness: the split takes every k-th prompt).
pub fn fit_probe(layer: usize, acts: ClassActivations<'_>, opts: &ProbeOptions) -> Result<Gate> {
    acts.validate()?;
    let train_h = acts.harmful.to_owned();
    let (train_s, val_s) = split_every(acts.harmless, opts.validation_share);
    let x = concatenate(Axis(0), &[train_h.view(), train_s.view()])
        .map_err(|e| CoreError::Shape(e.to_string()))?
        .mapv(f64::from);
    let n_h = train_h.nrows();
    let y: Array1<f64> = (0..x.nrows())
        .map(|i| if i < n_h { 1.0 } else { 0.0 })
        .collect();
    // Class-balanced sample weights: each class contributes half the loss.
    let weights: Array1<f64> = (0..x.nrows())
        .map(|i| {
            if i < n_h {
                0.5 / n_h as f64
            } else {
                0.5 / (x.nrows() - n_h) as f64
            }
        })
        .collect();
    let mean = x.mean_axis(Axis(0)).expect("non-empty");
    let std = x
        .std_axis(Axis(0), 0.0)
        .mapv(|s| if s > 1e-12 { s } else { 1.0 });
    let z = (&x - &mean) / &std;

    let (w, _) = logistic_regression(z.view(), y.view(), weights.view(), opts);
    // Back to raw activations: score = (a - mean)/std · w = a · (w/std) - mean · (w/std).
    let raw = &w / &std;
    let direction = normalized(raw.view())?;
    let d = Array1::from(direction.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
    let project_rows = |m: &Array2<f32>| -> Vec<f64> { m.mapv(f64::from).dot(&d).to_vec() };
    // Threshold: the harmless validation scores (or training ones, if there is no validation
    // split) must fire at most target_fpr of the time.
    let harmless_scores = if val_s.nrows() > 0 {
        project_rows(&val_s)
    } else {
        project_rows(&train_s)
    };
    let threshold = quantile_above(&harmless_scores, opts.target_fpr);
    Ok(Gate {
        layer,
        direction,
        bias: -threshold as f32,
    })
}

/// Minimise the weighted logistic loss `Σ wᵢ·log(1 + e^{−ŷᵢ·(zᵢ·w + b)}) + l2/2·|w|²` by
/// gradient descent with Nesterov momentum and step `1/L`, where `L` bounds the objective's
/// curvature: `¼·λmax(zᵀ·diag(weights)·z) + l2` (the sample weights sum to 1). Why the bound:
/// residual features are strongly correlated, so `λmax` is large (about 100 for SmolLM2's
/// standardised `last-and-mean` rows); the fixed step of 0.5 used before overshot by an order
/// of magnitude, the fit oscillated instead of converging, and how good it came out jumped
/// from layer to layer (cross-validated balanced accuracy 0.80 at layer 21, 0.94 at layer 22).
fn logistic_regression(
    z: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    weights: ArrayView1<'_, f64>,
    opts: &ProbeOptions,
) -> (Array1<f64>, f64) {
    let lr = 1.0 / (0.25 * top_eigenvalue(z, weights).max(1.0) + opts.l2);
    let momentum = 0.9;
    let mut w = Array1::<f64>::zeros(z.ncols());
    let mut b = 0.0;
    let (mut vw, mut vb) = (Array1::<f64>::zeros(z.ncols()), 0.0);
    for _ in 0..opts.iterations {
        let look_w = &w + &(&vw * momentum);
        let look_b = b + vb * momentum;
        let (grad_w, grad_b) = logistic_gradient(z, y, weights, opts.l2, &look_w, look_b);
        vw = &vw * momentum - &grad_w * lr;
        vb = vb * momentum - grad_b * lr;
        w += &vw;
        b += vb;
    }
    (w, b)
}

/// The gradient of [`logistic_regression`]'s objective at `(w, b)`.
fn logistic_gradient(
    z: ArrayView2<'_, f64>,
    y: ArrayView1<'_, f64>,
    weights: ArrayView1<'_, f64>,
    l2: f64,
    w: &Array1<f64>,
    b: f64,
) -> (Array1<f64>, f64) {
    let mut err_sum = 0.0;
    let grad = row_pass(z, w, |i, t| {
        let err = (sigmoid(t + b) - y[i]) * weights[i];
        err_sum += err;
        err
    });
    (grad + w * l2, err_sum)
}

/// `Σᵢ f(i, zᵢ·v)·zᵢ` in one pass over the rows of `z`. Why by rows: `z` (thousands of rows
/// of 2·hidden features) does not fit in cache, and computing `z·v` then `zᵀ·c` reads it twice,
/// the second time down its columns; one row at a time, each row is read once while in cache.
/// This is what makes fitting a gate per layer and fold affordable.
fn row_pass(
    z: ArrayView2<'_, f64>,
    v: &Array1<f64>,
    mut f: impl FnMut(usize, f64) -> f64,
) -> Array1<f64> {
    let mut out = Array1::<f64>::zeros(z.ncols());
    for (i, row) in z.outer_iter().enumerate() {
        out.scaled_add(f(i, row.dot(v)), &row);
    }
    out
}

/// The largest eigenvalue of `zᵀ·diag(weights)·z` by power iteration: an estimate from below,
/// within a few percent after 50 rounds; the step has room to spare, since ¼ is the logistic
/// curve's steepest slope and most rows sit where it is flatter.
fn top_eigenvalue(z: ArrayView2<'_, f64>, weights: ArrayView1<'_, f64>) -> f64 {
    let mut v = Array1::<f64>::from_elem(z.ncols(), 1.0 / (z.ncols() as f64).sqrt());
    let mut lambda = 0.0;
    for _ in 0..50 {
        let u = row_pass(z, &v, |i, t| weights[i] * t);
        lambda = u.dot(&u).sqrt();
        if lambda <= 0.0 {
            return 0.0;
        }
        v = u / lambda;
    }
    lambda
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The smallest threshold `t` such that at most `fpr` of `scores` are `> t`.
fn quantile_above(scores: &[f64], fpr: f64) -> f64 {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    let allowed = (fpr * sorted.len() as f64).floor() as usize;
    let idx = sorted.len().saturating_sub(allowed + 1);
    sorted[idx]
}

/// Split rows into (train, validation): every k-th row goes to validation.
fn split_every(x: ArrayView2<'_, f32>, share: f64) -> (Array2<f32>, Array2<f32>) {
    if share <= 0.0 || x.nrows() < 5 {
        return (x.to_owned(), Array2::zeros((0, x.ncols())));
    }
    let k = (1.0 / share).round().max(2.0) as usize;
    let (val, train): (Vec<usize>, Vec<usize>) = (0..x.nrows()).partition(|i| i % k == k - 1);
    (x.select(Axis(0), &train), x.select(Axis(0), &val))
}

/// Fit a gate with the chosen estimator.
pub fn fit_gate(
    estimator: GateEstimator,
    layer: usize,
    acts: ClassActivations<'_>,
    probe: &ProbeOptions,
) -> Result<Gate> {
    match estimator {
        GateEstimator::MeanDiff => fit_mean_diff(layer, acts),
        GateEstimator::Probe => fit_probe(layer, acts, probe),
    }
}

/// True/false positive counts of a gate on labelled activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Confusion {
    /// Harmful prompts the gate caught.
    pub true_positives: usize,
    /// Harmful prompts it let through.
    pub false_negatives: usize,
    /// Harmless prompts it flagged.
    pub false_positives: usize,
    /// Harmless prompts it let through.
    pub true_negatives: usize,
}

impl Confusion {
    /// Count a gate's decisions.
    pub fn of(gate: &Gate, acts: ClassActivations<'_>, offset: f32) -> Self {
        let fired =
            |m: ArrayView2<'_, f32>| m.outer_iter().filter(|a| gate.fires(*a, offset)).count();
        let tp = fired(acts.harmful);
        let fp = fired(acts.harmless);
        Self {
            true_positives: tp,
            false_negatives: acts.harmful.nrows() - tp,
            false_positives: fp,
            true_negatives: acts.harmless.nrows() - fp,
        }
    }

    /// Share of harmful prompts caught.
    pub fn tpr(&self) -> f64 {
        ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        )
    }

    /// Share of harmless prompts flagged.
    pub fn fpr(&self) -> f64 {
        ratio(
            self.false_positives,
            self.false_positives + self.true_negatives,
        )
    }

    /// Class-balanced accuracy: the mean of TPR and TNR (the sets are rarely balanced).
    pub fn balanced_accuracy(&self) -> f64 {
        0.5 * (self.tpr() + (1.0 - self.fpr()))
    }

    fn add(&mut self, o: Self) {
        self.true_positives += o.true_positives;
        self.false_negatives += o.false_negatives;
        self.false_positives += o.false_positives;
        self.true_negatives += o.true_negatives;
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Out-of-fold confusion of an estimator with `k`-fold stratified cross-validation (fold of a
/// prompt = its index mod k, so the result does not depend on any RNG).
pub fn cross_validate(
    estimator: GateEstimator,
    acts: ClassActivations<'_>,
    k: usize,
    probe: &ProbeOptions,
) -> Result<Confusion> {
    acts.validate()?;
    if k < 2 || acts.harmful.nrows() < k || acts.harmless.nrows() < k {
        return Err(CoreError::Empty(format!(
            "{k}-fold cross-validation needs at least {k} prompts of each class"
        )));
    }
    let mut total = Confusion::default();
    for fold in 0..k {
        let pick = |m: ArrayView2<'_, f32>, held: bool| {
            let rows: Vec<usize> = (0..m.nrows()).filter(|i| (i % k == fold) == held).collect();
            m.select(Axis(0), &rows)
        };
        let (train_h, test_h) = (pick(acts.harmful, false), pick(acts.harmful, true));
        let (train_s, test_s) = (pick(acts.harmless, false), pick(acts.harmless, true));
        let gate = fit_gate(
            estimator,
            0,
            ClassActivations {
                harmful: train_h.view(),
                harmless: train_s.view(),
            },
            probe,
        )?;
        total.add(Confusion::of(
            &gate,
            ClassActivations {
                harmful: test_h.view(),
                harmless: test_s.view(),
            },
            0.0,
        ));
    }
    Ok(total)
}

/// The layer with the best cross-validated balanced accuracy; ties go to the earlier (cheaper)
/// layer. `accuracy[l]` is layer `l`'s score.
pub fn choose_gate_layer(accuracy: &[f64]) -> Result<usize> {
    if accuracy.is_empty() || accuracy.iter().any(|a| !a.is_finite()) {
        return Err(CoreError::NonFinite(
            "per-layer accuracies are missing or NaN".into(),
        ));
    }
    let mut best = 0;
    for (l, &a) in accuracy.iter().enumerate() {
        if a > accuracy[best] {
            best = l;
        }
    }
    Ok(best)
}

/// Area under the ROC curve of scores (harmful should score higher), with ties counted half.
pub fn roc_auc(harmful: &[f64], harmless: &[f64]) -> f64 {
    let mut wins = 0.0;
    for &h in harmful {
        for &s in harmless {
            wins += if h > s {
                1.0
            } else if h == s {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (harmful.len() * harmless.len()).max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of 64 standardised features that all carry one shared factor (as residual
    /// dimensions do), the classes overlapping heavily along it (as where the gate is unsure):
    /// near the optimum the objective's curvature is ~64 times a single feature's.
    fn correlated_rows(n: usize) -> (Array2<f64>, Array1<f64>, Array1<f64>) {
        let mut uniform = crate::tests::uniform(7);
        let (cols, mut z, mut y) = (64, Vec::new(), Vec::new());
        for i in 0..n {
            let label = (i % 2) as f64;
            let factor = 0.3 * (label - 0.5) + uniform() * 2.0;
            z.extend((0..cols).map(|_| factor + 0.3 * uniform()));
            y.push(label);
        }
        let z = Array2::from_shape_vec((n, cols), z).unwrap();
        let z = (&z - &z.mean_axis(Axis(0)).unwrap()) / &z.std_axis(Axis(0), 0.0);
        (z, Array1::from(y), Array1::from_elem(n, 1.0 / n as f64))
    }

    #[test]
    fn the_probe_converges_on_correlated_features() {
        let (z, y, weights) = correlated_rows(400);
        let opts = ProbeOptions::default();
        let norm = |(g, b): (Array1<f64>, f64)| (g.dot(&g) + b * b).sqrt();
        let start = norm(logistic_gradient(
            z.view(),
            y.view(),
            weights.view(),
            opts.l2,
            &Array1::zeros(z.ncols()),
            0.0,
        ));
        let (w, b) = logistic_regression(z.view(), y.view(), weights.view(), &opts);
        let end = norm(logistic_gradient(
            z.view(),
            y.view(),
            weights.view(),
            opts.l2,
            &w,
            b,
        ));
        assert!(end < 1e-3 * start, "gradient norm {start} -> {end}");
    }

    #[test]
    fn the_curvature_bound_is_the_top_eigenvalue() {
        // diag(weights) = I/2 and z = [[2, 0], [0, 1]]: zᵀ·W·z = diag(2, 0.5).
        let z = ndarray::array![[2.0, 0.0], [0.0, 1.0]];
        let lambda = top_eigenvalue(z.view(), ndarray::array![0.5, 0.5].view());
        assert!((lambda - 2.0).abs() < 1e-6, "{lambda}");
    }
}
