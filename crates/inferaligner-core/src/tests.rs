//! Property tests of the steering math.

use ndarray::{Array2, ArrayView2, Axis};
use proptest::prelude::*;

use crate::*;

/// Uniform draws in [−0.5, 0.5) from a seeded LCG (no RNG crate: enough for test data).
pub(crate) fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5
    }
}

/// Two Gaussian-ish classes `separation` apart along a random direction (seeded, no RNG crate:
/// a simple LCG is enough for test data).
fn classes(
    seed: u64,
    n_h: usize,
    n_s: usize,
    hidden: usize,
    separation: f32,
) -> (Array2<f32>, Array2<f32>, Vec<f32>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // sum of uniforms ≈ normal
        (0..4)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .sum::<f32>()
    };
    let dir: Vec<f32> = (0..hidden).map(|_| next()).collect();
    let norm = dir.iter().map(|x| x * x).sum::<f32>().sqrt();
    let dir: Vec<f32> = dir.iter().map(|x| x / norm).collect();
    let base: Vec<f32> = (0..hidden).map(|_| 3.0 * next()).collect();
    let mut sample = |n: usize, sign: f32| {
        Array2::from_shape_fn((n, hidden), |(_, j)| {
            base[j] + next() + sign * 0.5 * separation * dir[j]
        })
    };
    let h = sample(n_h, 1.0);
    let s = sample(n_s, -1.0);
    (h, s, dir)
}

fn acts<'a>(h: &'a Array2<f32>, s: &'a Array2<f32>) -> ClassActivations<'a> {
    ClassActivations {
        harmful: h.view(),
        harmless: s.view(),
    }
}

fn reversed(x: ArrayView2<'_, f32>) -> Array2<f32> {
    let rows: Vec<usize> = (0..x.nrows()).rev().collect();
    x.select(Axis(0), &rows)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn srv_is_unit_and_points_from_harmless_to_harmful(seed in 0u64..1000, n in 2usize..30, hidden in 2usize..24) {
        let (h, s, _) = classes(seed, n, n + 3, hidden, 4.0);
        let srv = safety_related_vector(acts(&h, &s)).unwrap();
        let norm: f32 = srv.iter().map(|x| x * x).sum::<f32>().sqrt();
        prop_assert!((norm - 1.0).abs() < 1e-5);
        let gap = h.mean_axis(Axis(0)).unwrap() - s.mean_axis(Axis(0)).unwrap();
        prop_assert!(project(gap.view(), &srv) > 0.0);
    }

    #[test]
    fn orthogonalized_is_unit_and_orthogonal_and_keeps_the_rest(seed in 0u64..1000, hidden in 2usize..24) {
        let (h, s, _) = classes(seed, 2, 3, hidden, 4.0);
        let direction = safety_related_vector(acts(&h, &s)).unwrap();
        let v: Vec<f32> = h.row(0).to_vec();
        let rest: Vec<f32> = {
            let along = project(h.row(0), &direction) as f32;
            v.iter().zip(&direction).map(|(a, d)| a - along * d).collect()
        };
        prop_assume!(rest.iter().map(|x| x * x).sum::<f32>() > 1e-6);
        let o = orthogonalized(&v, &direction).unwrap();
        let norm: f32 = o.iter().map(|x| x * x).sum::<f32>().sqrt();
        prop_assert!((norm - 1.0).abs() < 1e-5);
        prop_assert!(project(ndarray::ArrayView1::from(&o[..]), &direction).abs() < 1e-4);
        prop_assert!(project(ndarray::ArrayView1::from(&rest[..]), &o) > 0.0);
    }

    #[test]
    fn mean_diff_bias_sits_at_the_class_midpoint(seed in 0u64..1000, n in 2usize..30, hidden in 2usize..16) {
        // Balanced sets: the midpoint equals minus the mean projection of all prompts (the paper).
        let (h, s, _) = classes(seed, n, n, hidden, 3.0);
        let gate = fit_mean_diff(3, acts(&h, &s)).unwrap();
        let all: f64 = h.outer_iter().chain(s.outer_iter()).map(|a| project(a, &gate.direction)).sum::<f64>()
            / (2 * n) as f64;
        prop_assert!((f64::from(gate.bias) + all).abs() < 1e-3 * (1.0 + all.abs()));
        prop_assert_eq!(gate.layer, 3);
    }

    #[test]
    fn prompt_order_does_not_matter(seed in 0u64..1000, n in 2usize..20, hidden in 2usize..16) {
        let (h, s, _) = classes(seed, n, n + 5, hidden, 3.0);
        let a = fit_mean_diff(0, acts(&h, &s)).unwrap();
        let (hr, sr) = (reversed(h.view()), reversed(s.view()));
        let b = fit_mean_diff(0, acts(&hr, &sr)).unwrap();
        for (x, y) in a.direction.iter().zip(&b.direction) {
            prop_assert!((x - y).abs() < 1e-5);
        }
        prop_assert!((a.bias - b.bias).abs() < 1e-3 * (1.0 + a.bias.abs()));
    }

    #[test]
    fn bad_inputs_are_rejected(hidden in 1usize..8) {
        let ok = Array2::<f32>::ones((3, hidden));
        let empty = Array2::<f32>::zeros((0, hidden));
        let wider = Array2::<f32>::ones((3, hidden + 1));
        let mut nan = Array2::<f32>::ones((3, hidden));
        nan[[1, 0]] = f32::NAN;
        prop_assert_eq!(safety_related_vector(acts(&empty, &ok)).unwrap_err().kind(), "empty");
        prop_assert_eq!(safety_related_vector(acts(&ok, &wider)).unwrap_err().kind(), "shape");
        prop_assert_eq!(safety_related_vector(acts(&nan, &ok)).unwrap_err().kind(), "non_finite");
        prop_assert_eq!(safety_related_vector(acts(&ok, &ok)).unwrap_err().kind(), "degenerate");
    }
}

#[test]
fn mean_diff_gate_separates_separable_classes_and_offset_tightens_it() {
    let (h, s, _) = classes(7, 40, 120, 16, 8.0);
    let gate = fit_mean_diff(0, acts(&h, &s)).unwrap();
    let c = Confusion::of(&gate, acts(&h, &s), 0.0);
    assert!(c.tpr() > 0.95 && c.fpr() < 0.05, "{c:?}");
    // A large positive offset makes everything fire; a large negative one nothing.
    assert_eq!(Confusion::of(&gate, acts(&h, &s), 1e6).fpr(), 1.0);
    assert_eq!(Confusion::of(&gate, acts(&h, &s), -1e6).tpr(), 0.0);
}

#[test]
fn probe_meets_its_false_positive_target_on_held_out_data() {
    // Imbalanced like the reference calibration set (260 vs 1000), tested on fresh rows.
    let (h, s, _) = classes(11, 460, 1800, 24, 3.0);
    let (fit_h, test_h) = h.view().split_at(Axis(0), 260);
    let (fit_s, test_s) = s.view().split_at(Axis(0), 1000);
    let opts = ProbeOptions::default();
    let fit = ClassActivations {
        harmful: fit_h,
        harmless: fit_s,
    };
    let gate = fit_probe(5, fit, &opts).unwrap();
    let c = Confusion::of(
        &gate,
        ClassActivations {
            harmful: test_h,
            harmless: test_s,
        },
        0.0,
    );
    assert!(c.fpr() <= 0.05, "{c:?}");
    assert!(c.tpr() > 0.8, "{c:?}");
    let norm: f32 = gate.direction.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5);
}

#[test]
fn probe_beats_mean_diff_when_a_nuisance_direction_has_high_variance() {
    // Class means differ along axis 0 but axis 1 carries large shared noise correlated with
    // axis 0, which the mean difference ignores and the probe learns to cancel.
    let n = 300;
    let mut uniform = uniform(1);
    let mut noise = move || uniform() as f32;
    let mut rows_h = Vec::new();
    let mut rows_s = Vec::new();
    for _ in 0..n {
        let big = 20.0 * noise();
        rows_h.extend([1.0 + big + 0.2 * noise(), big]);
        let big = 20.0 * noise();
        rows_s.extend([-1.0 + big + 0.2 * noise(), big]);
    }
    let h = Array2::from_shape_vec((n, 2), rows_h).unwrap();
    let s = Array2::from_shape_vec((n, 2), rows_s).unwrap();
    let md = Confusion::of(&fit_mean_diff(0, acts(&h, &s)).unwrap(), acts(&h, &s), 0.0);
    let opts = ProbeOptions {
        iterations: 1000,
        ..ProbeOptions::default()
    };
    let pr = Confusion::of(
        &fit_probe(0, acts(&h, &s), &opts).unwrap(),
        acts(&h, &s),
        0.0,
    );
    assert!(pr.balanced_accuracy() > 0.95, "probe {pr:?}");
    assert!(md.balanced_accuracy() < 0.8, "mean-diff {md:?}");
}

#[test]
fn cross_validation_and_layer_choice() {
    let per_layer: Vec<f64> = [0.5, 2.0, 6.0, 6.0, 1.0]
        .iter()
        .enumerate()
        .map(|(l, &sep)| {
            let (h, s, _) = classes(l as u64, 30, 30, 8, sep);
            cross_validate(
                GateEstimator::MeanDiff,
                acts(&h, &s),
                5,
                &ProbeOptions::default(),
            )
            .unwrap()
            .balanced_accuracy()
        })
        .collect();
    assert!(
        per_layer[2] > per_layer[0] && per_layer[3] > per_layer[4],
        "{per_layer:?}"
    );
    assert_eq!(
        choose_gate_layer(&[0.5, 0.9, 0.9, 0.7]).unwrap(),
        1,
        "ties → earlier layer"
    );
    assert!(choose_gate_layer(&[]).is_err());
    assert!(choose_gate_layer(&[0.5, f64::NAN]).is_err());
    let (h, s, _) = classes(1, 3, 3, 4, 1.0);
    assert_eq!(
        cross_validate(
            GateEstimator::MeanDiff,
            acts(&h, &s),
            5,
            &ProbeOptions::default()
        )
        .unwrap_err()
        .kind(),
        "empty"
    );
}

#[test]
fn auc_counts_pairs_and_ties() {
    assert_eq!(roc_auc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
    assert_eq!(roc_auc(&[1.0], &[2.0]), 0.0);
    assert_eq!(roc_auc(&[2.0], &[2.0]), 0.5);
}

#[test]
fn contrastive_vector_points_toward_refusal() {
    let refusal = Array2::from_shape_vec((2, 3), vec![1.0, 0.0, 1.0, 1.2, 0.0, 0.8]).unwrap();
    let comply = Array2::from_shape_vec((2, 3), vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).unwrap();
    let v = contrastive_vector(refusal.view(), comply.view()).unwrap();
    assert!(v[0] > 0.99);
}

#[test]
fn default_steering_is_the_middle_layers_at_a_fraction_of_the_residual_norm() {
    // SmolLM2's 30 layers: 12–20, as the committed packs say
    assert_eq!(default_steered_layers(30), (12..=20).collect::<Vec<_>>());
    assert_eq!(default_steered_layers(2), vec![0, 1]);
    assert_eq!(default_steered_layers(1), vec![0]);
    // rows of norm 5 and 10 at one layer, 20 at another: mean 35/3
    let a = ndarray::array![[3.0f32, 4.0], [6.0, 8.0]];
    let b = ndarray::array![[0.0f32, 20.0]];
    let alpha = default_alpha(0.3, &[a.view(), b.view()]).expect("rows");
    assert!((alpha - 0.3 * 35.0 / 3.0).abs() < 1e-5, "{alpha}");
    assert!(default_alpha(0.05, &[]).is_err());
}
