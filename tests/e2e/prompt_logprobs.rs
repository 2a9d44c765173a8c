//! Scoring a prompt (`GenerationParams::prompt_logprobs`, OpenAI's `echo` with `logprobs`) on
//! the tiny fixtures: each prompt token after the first gets the log-probability the model gives
//! it after the tokens before it, against the numpy reference's logits, whatever the chunking,
//! the prefix cache (whose blocks keep the head's inputs for later scored prompts) or a pending
//! gate.

use std::sync::Arc;

use inferaligner_e2e::{fixture_model, golden, greedy, tiny_llama, tiny_llama_fused};
use inferaligner_runtime::{
    AfterGate, ChatTokenizer, EarlyExit, Engine, EngineConfig, FinishReason, GenerationEvent,
    GenerationParams, GenerationRequest, PREFIX_BLOCK_TOKENS, RowContext, TokenLogprobs,
    collect_events,
};

fn engine(dir: &std::path::Path, prefill_chunk_tokens: usize) -> Engine {
    let model = fixture_model(dir);
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
    let config = EngineConfig {
        prefill_chunk_tokens,
        ..EngineConfig::default()
    };
    Engine::start(model, tokenizer, None, config).expect("engine starts")
}

/// Score `prompt` with `top` alternatives and `max_new_tokens` after it: the scores and the
/// events that followed them.
fn score(
    engine: &Engine,
    prompt: &[u32],
    (top, max_new_tokens): (usize, usize),
    gate: Option<EarlyExit>,
) -> (Vec<TokenLogprobs>, Vec<GenerationEvent>) {
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        params: GenerationParams {
            prompt_logprobs: Some(top),
            ..greedy(max_new_tokens)
        },
        row: RowContext::default(),
        gate,
        sink: Box::new(|_| std::ops::ControlFlow::Continue(())),
    };
    let mut events = collect_events(engine, request).expect("accepted");
    match events.remove(0) {
        GenerationEvent::PromptLogprobs(scores) => (scores, events),
        other => panic!("the scores come first, got {other:?}"),
    }
}

/// Scores of a prompt scored twice, the second time over `reused` positions from the prefix
/// cache: those read through the head from the cached head inputs are the first scoring's
/// exactly; the positions after them attend to the cached KV in chunks that start elsewhere,
/// so they agree to 1e-5, with the same alternatives.
fn assert_rescored(a: &[TokenLogprobs], b: &[TokenLogprobs], reused: usize, what: &str) {
    assert_eq!(a[..reused], b[..reused], "{what}: the reused positions");
    assert_close(&a[reused..], &b[reused..], what);
}

/// Scores equal to 1e-5, alternatives alike.
fn assert_close(a: &[TokenLogprobs], b: &[TokenLogprobs], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x.logprob - y.logprob).abs() < 1e-5,
            "{what}: {x:?} vs {y:?}"
        );
        assert_eq!(
            x.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            y.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            "{what}"
        );
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits.iter().map(|&l| l as f64 - max - sum.ln()).collect()
}

#[test]
fn scored_prompts_match_the_reference_in_any_chunking_and_twice_over_the_prefix_cache() {
    for dir in [tiny_llama(), tiny_llama_fused()] {
        let golden = golden(&dir);
        let mut by_chunking: Vec<Vec<Vec<TokenLogprobs>>> = Vec::new();
        for chunk in [5, 128] {
            let engine = engine(&dir, chunk);
            let mut scored = Vec::new();
            for case in &golden.cases {
                // the chat prompt followed by the reference's greedy answer, scored as one text
                let ids: Vec<u32> = case.input_ids.iter().map(|&i| i as u32).collect();
                let text: Vec<u32> = ids.iter().chain(&case.greedy_ids).copied().collect();
                let (scores, rest) = score(&engine, &text, (3, 0), None);
                assert_eq!(scores.len(), text.len() - 1, "every token after the first");
                // the prompt alone was asked for: nothing generated
                match rest.as_slice() {
                    [GenerationEvent::Finished { reason, usage, .. }] => {
                        assert_eq!(*reason, FinishReason::Length);
                        assert_eq!(usage.completion_tokens, 0);
                        assert_eq!(usage.prompt_tokens, text.len());
                    }
                    other => panic!("{other:?}"),
                }
                // the first answer token, against the numpy reference's logits at the prompt's
                // last position
                let reference = log_softmax(&case.last_logits);
                let first = &scores[ids.len() - 1];
                let want = reference[case.greedy_ids[0] as usize];
                assert!(
                    (first.logprob as f64 - want).abs() < 1e-4,
                    "{}: {} vs {want}",
                    dir.display(),
                    first.logprob
                );
                let mut best: Vec<(usize, f64)> = reference.iter().copied().enumerate().collect();
                best.sort_by(|a, b| b.1.total_cmp(&a.1));
                for ((id, lp), (want_id, want_lp)) in first.top.iter().zip(&best) {
                    assert_eq!(*id as usize, *want_id);
                    assert!((*lp as f64 - want_lp).abs() < 1e-4);
                }
                // the greedy answer is each of its positions' most likely token
                for (k, &id) in case.greedy_ids.iter().enumerate() {
                    let s = &scores[ids.len() - 1 + k];
                    assert_eq!(s.top[0].0, id, "position {k} of the answer");
                    assert_eq!(s.top[0].1, s.logprob);
                }
                // again: the prompt's whole blocks are in the prefix cache now, with the
                // head's inputs, and their scores are read from those (counted below)
                let (again, _) = score(&engine, &text, (3, 0), None);
                let reused = (text.len() - 1) / PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS;
                assert_rescored(&again, &scores, reused, "scored over the prefix cache");
                // another ending after the same prefix: the shared part scores alike, the new
                // last token as the reference's top-3 at that position say
                let mut other = text.clone();
                let last = other.len() - 1;
                other[last] = scores[last - 1].top[1].0;
                let (changed, _) = score(&engine, &other, (3, 0), None);
                let shared = (last - 1) / PREFIX_BLOCK_TOKENS * PREFIX_BLOCK_TOKENS;
                assert_rescored(
                    &changed[..last - 1],
                    &scores[..last - 1],
                    shared,
                    "shared prefix",
                );
                assert!((changed[last - 1].logprob - scores[last - 1].top[1].1).abs() < 1e-4);
                scored.push(scores);
            }
            by_chunking.push(scored);
        }
        for (a, b) in by_chunking[0].iter().zip(&by_chunking[1]) {
            for (x, y) in a.iter().zip(b) {
                assert!((x.logprob - y.logprob).abs() < 1e-4, "chunks of 5 vs 128");
                assert_eq!(
                    x.top.iter().map(|t| t.0).collect::<Vec<_>>(),
                    y.top.iter().map(|t| t.0).collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn a_scored_prompt_reuses_the_blocks_an_earlier_scored_prompt_stored() {
    let dir = tiny_llama();
    let case = &golden(&dir).cases[0];
    let text: Vec<u32> = (case.input_ids.iter().map(|&i| i as u32))
        .chain(case.greedy_ids.iter().copied())
        .collect();
    let blocks = (text.len() - 1) / PREFIX_BLOCK_TOKENS;
    assert!(blocks > 0, "long enough to reuse a block");
    let engine = engine(&dir, 5);
    let unscored = |prompt: &[u32]| {
        let request = GenerationRequest {
            prompt: prompt.to_vec(),
            params: greedy(1),
            row: RowContext::default(),
            gate: None,
            sink: Box::new(|_| std::ops::ControlFlow::Continue(())),
        };
        collect_events(&engine, request).expect("accepted");
    };
    // answered first: its blocks hold KV but no head inputs, so the first scoring reuses
    // nothing (and stores them with); the second reuses every whole block
    unscored(&text);
    let (first, _) = score(&engine, &text, (1, 0), None);
    let (second, _) = score(&engine, &text, (1, 0), None);
    assert_rescored(&second, &first, blocks * PREFIX_BLOCK_TOKENS, "reused");
    // the engine publishes its counts between requests: after one more (too short to reuse
    // anything), the counts hold the second scoring's
    unscored(&text[..5]);
    let reused = engine.kv_usage().prefix_stats().reused_tokens;
    assert_eq!(reused, (blocks * PREFIX_BLOCK_TOKENS) as u64);
}

#[test]
fn a_scored_prompt_reads_the_same_behind_a_gate_and_then_generates_as_unscored() {
    let dir = tiny_llama();
    let engine = engine(&dir, 7);
    let case = &golden(&dir).cases[0];
    let ids: Vec<u32> = case.input_ids.iter().map(|&i| i as u32).collect();
    let gate = |view: Option<Vec<u32>>| EarlyExit {
        after_layer: 1,
        view,
        mean_from: None,
        more_views: Vec::new(),
        decide: Box::new(|_: &[f32]| AfterGate::Generate(RowContext::default())),
    };
    let (plain, rest) = score(&engine, &ids, (2, 4), None);
    // the answer after the scores is the reference's greedy one
    let answer: Vec<u32> = rest
        .iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(answer, case.greedy_ids[..4]);
    // gated on the prompt itself (its gate-phase chunks resumed) or on a view of its own
    for view in [None, Some(ids[ids.len() / 2..].to_vec())] {
        let (gated, rest_gated) = score(&engine, &ids, (2, 4), Some(gate(view)));
        for (x, y) in plain.iter().zip(&gated) {
            assert!((x.logprob - y.logprob).abs() < 1e-5);
        }
        assert_eq!(gated.len(), plain.len());
        assert_eq!(rest_gated, rest);
    }
}
