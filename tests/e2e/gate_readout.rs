//! The pooled gate readout on the tiny fixtures: a gate with `mean_from` reads the last token's
//! residual at the gate layer and the mean over the tokens from there on — what one whole pass
//! gives — in any chunking, and a warm prefix cache never stands in for a token the mean needs.

use std::sync::{Arc, Mutex};

use inferaligner_e2e::{fixture_model, max_abs_diff, tiny_llama, tiny_llama_fused};
use inferaligner_runtime::{
    AfterGate, EarlyExit, LayerSplitModel, PREFIX_BLOCK_TOKENS, PrefixCache, RowContext,
};

const GATE_LAYER: usize = 2;

/// A 70-token shared start and a tail that differs per `k`.
fn prompt(k: u32) -> Vec<u32> {
    let start = (0..70).map(|i| (i * 37 % 290) as u32 + 3);
    let tail = (0..12).map(|i| (i * 11 + k * 5) % 290 + 3);
    start.chain(tail).collect()
}

type Seen = Arc<Mutex<Vec<Vec<f32>>>>;

fn gate(mean_from: Option<usize>, seen: &Seen) -> EarlyExit {
    let seen = seen.clone();
    EarlyExit {
        view: None,
        after_layer: GATE_LAYER,
        mean_from,
        more_views: Vec::new(),
        decide: Box::new(move |r: &[f32]| {
            seen.lock().expect("lock").push(r.to_vec());
            // as in proxy mode: only gate phases consult the cache
            AfterGate::End
        }),
    }
}

/// The gate layer's last residual, then its mean over `ids[from..]`, in one pass.
fn reference(model: &mut LayerSplitModel, ids: &[u32], from: usize) -> Vec<f32> {
    let depth = model.residual_index(GATE_LAYER).expect("a boundary");
    let ids = [ids.to_vec()];
    let means = model
        .span_means(&ids, &[&[ids[0].len() - 1], &[from]])
        .expect("runs");
    means
        .iter()
        .flat_map(|m| m.slice(ndarray::s![0, depth, ..]).to_vec())
        .collect()
}

#[test]
fn the_mean_readout_is_the_mean_of_one_whole_pass() {
    for dir in [tiny_llama(), tiny_llama_fused()] {
        mean_readout_matches(fixture_model(&dir));
    }
}

fn mean_readout_matches(mut model: LayerSplitModel) {
    let n = prompt(0).len();
    for chunk in [3, 64] {
        for from in [0, 40, n - 1, n + 5] {
            let mut cache = PrefixCache::new(1024).expect("on");
            for k in 0..2 {
                let ids = prompt(k);
                let seen = Seen::default();
                model
                    .prefill_prompt(
                        &ids,
                        chunk,
                        None,
                        RowContext::default(),
                        Some(gate(Some(from), &seen)),
                        Some(&mut cache),
                    )
                    .expect("runs");
                let got = seen.lock().expect("lock").pop().expect("decided");
                let expected = reference(&mut model, &ids, from.min(n - 1));
                let diff = max_abs_diff(&got, &expected);
                assert!(diff < 1e-4, "chunk {chunk}, from {from}, k {k}: {diff}");
            }
            // the second prompt shares 70 tokens with the first, but reuses only the whole
            // blocks before `from`
            let reusable = from.min(n - 1).min(70) / PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS;
            assert_eq!(
                cache.stats().reused_tokens,
                reusable as u64,
                "chunk {chunk}, from {from}"
            );
        }
    }
}

#[test]
fn the_last_token_comes_first_and_alone_without_a_mean() {
    // `mean_from: None` reads the last token alone; with a mean it comes first, and a mean
    // from the last token equals it
    let mut model = fixture_model(&tiny_llama());
    let ids = prompt(3);
    let read = |model: &mut LayerSplitModel, mean_from| {
        let seen = Seen::default();
        model
            .prefill_prompt(
                &ids,
                16,
                None,
                RowContext::default(),
                Some(gate(mean_from, &seen)),
                None,
            )
            .expect("runs");
        seen.lock().expect("lock").pop().expect("decided")
    };
    let last = read(&mut model, None);
    let hidden = model.manifest().hidden_size;
    assert_eq!(last.len(), hidden);
    let of_last = read(&mut model, Some(ids.len() - 1));
    let of_all = read(&mut model, Some(0));
    assert_eq!((of_last.len(), of_all.len()), (2 * hidden, 2 * hidden));
    assert!(max_abs_diff(&last, &of_last[..hidden]) < 1e-6);
    assert!(max_abs_diff(&last, &of_last[hidden..]) < 1e-6);
    assert!(max_abs_diff(&last, &of_all[..hidden]) < 1e-6);
    assert!(max_abs_diff(&last, &of_all[hidden..]) > 1e-3);
}
