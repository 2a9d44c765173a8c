//! The prefix cache on the tiny fixture: a prefill that reuses a cached prefix gives the logits
//! and KV of one that computes everything — gated or not, steered or not, gate view or prompt —
//! steered rows reuse the steered KV of rows steered alike, and the unsteered part (the layers
//! before the steering, and the residual there) of rows steered otherwise, and the engine
//! generates the same tokens with the cache as without it.

use std::sync::Arc;

use inferaligner_e2e::{
    fixture_model, greedy, max_abs_diff, sawtooth_hook, steered_row, tiny_llama, tiny_llama_fused,
    tiny_model, tokens,
};
use inferaligner_runtime::{
    AddVectors, AfterGate, ChatTokenizer, EarlyExit, Engine, EngineConfig, GenerationRequest,
    LayerSplitModel, PREFIX_BLOCK_TOKENS, Prefilled, PrefixCache, RowContext, collect_events,
};

/// The hook steers layers 1 and 3 of the fixture's 4.
fn hook(hidden: usize) -> AddVectors {
    sawtooth_hook(hidden, 7)
}

fn steered() -> RowContext {
    steered_row(3.0)
}

/// A shared 70-token "system prompt" (four whole blocks and 6 tokens) and a varied tail.
fn prompt(tail: u32) -> Vec<u32> {
    let system = (0..70).map(|i| (i * 37 % 290) as u32 + 3);
    let question = (0..9).map(|i| (i * 11 + tail * 5) % 290 + 3);
    system.chain(question).collect()
}

fn gate_at(layer: usize, verdict: fn() -> AfterGate, view: Option<Vec<u32>>) -> EarlyExit {
    EarlyExit {
        view,
        after_layer: layer,
        mean_from: None,
        more_views: Vec::new(),
        decide: Box::new(move |_: &[f32]| verdict()),
    }
}

fn harmless() -> AfterGate {
    AfterGate::Generate(RowContext::default())
}

fn harmful() -> AfterGate {
    AfterGate::Generate(steered())
}

/// Whether a prefill that generated gave `expected`.
fn same(got: Option<Vec<f32>>, expected: &[f32]) -> bool {
    max_abs_diff(&got.expect("generates"), expected) < 1e-4
}

/// Logits, then every layer's K and V of row 0's filled slots.
fn contents(p: &Prefilled, layers: usize) -> Vec<f32> {
    let fill = p.cache.fill()[0];
    let mut out = p.logits.row(0).to_vec();
    for l in 0..layers {
        let (k, v) = p.cache.layer(l);
        let s = ndarray::s![0, .., ..fill, ..];
        out.extend(k.slice(s).iter().chain(v.slice(s).iter()));
    }
    out
}

#[test]
fn a_reused_prefix_gives_what_computing_it_gives() {
    for dir in [tiny_llama(), tiny_llama_fused()] {
        reuse_gives_what_computing_gives(fixture_model(&dir));
    }
}

fn reuse_gives_what_computing_gives(mut model: LayerSplitModel) {
    let layers = model.manifest().num_layers;
    let mut hook = hook(model.manifest().hidden_size);
    let shared = 4 * PREFIX_BLOCK_TOKENS;
    for chunk in [5, 64] {
        let mut run = |ids: &[u32], row, gate, cache: Option<&mut PrefixCache>| {
            model
                .prefill_prompt(ids, chunk, Some(&mut hook), row, gate, cache)
                .expect("runs")
                .map(|p| contents(&p, layers))
        };
        let mut cache = PrefixCache::new(1024).expect("on");

        // a proxy-mode gate fills the cache up to the gate layer only
        let ended = run(
            &prompt(1),
            RowContext::default(),
            Some(gate_at(2, || AfterGate::End, None)),
            Some(&mut cache),
        );
        assert_eq!(ended, None);
        assert_eq!(cache.stats().hits, 0);

        // the next gate reuses it; a harmless decision needs every layer: computed again
        let expected = run(&prompt(2), RowContext::default(), None, None).expect("no gate");
        let got = run(
            &prompt(2),
            RowContext::default(),
            Some(gate_at(2, harmless, None)),
            Some(&mut cache),
        );
        assert!(same(got, &expected), "chunk {chunk}");
        assert_eq!(
            (cache.stats().hits, cache.stats().reused_tokens),
            (1, shared as u64)
        );

        // now the blocks hold every layer: gate and prefill both start after the prefix
        let expected = run(&prompt(3), RowContext::default(), None, None).expect("no gate");
        let got = run(
            &prompt(3),
            RowContext::default(),
            Some(gate_at(2, harmless, None)),
            Some(&mut cache),
        );
        assert!(same(got, &expected), "chunk {chunk}");
        let got = run(&prompt(3), RowContext::default(), None, Some(&mut cache));
        assert!(same(got, &expected), "chunk {chunk}");

        // a steered decision, before or after the gate layer, never reads the unsteered prefix:
        // the first steered prefill computes the prompt, and leaves its steered blocks for the
        // next row steered alike
        let expected = run(&prompt(4), steered(), None, None).expect("no gate");
        for gate_layer in [0, 2] {
            let before = cache.stats();
            let got = run(
                &prompt(4),
                RowContext::default(),
                Some(gate_at(gate_layer, harmful, None)),
                Some(&mut cache),
            );
            assert!(same(got, &expected), "chunk {chunk}, gate {gate_layer}");
            // the gate phase reuses the unsteered prefix either way; the steered phase finds
            // its own prefix only once the first steered prefill stored it
            let reused = cache.stats().reused_tokens - before.reused_tokens;
            assert_eq!(
                reused,
                shared as u64 + if gate_layer == 0 { 0 } else { shared as u64 },
                "chunk {chunk}, gate {gate_layer}"
            );
        }
        // a row steered from the start reads the steered prefix; another strength does not
        let before = cache.stats();
        let got = run(&prompt(5), steered(), None, Some(&mut cache));
        assert!(same(
            got,
            &run(&prompt(5), steered(), None, None).expect("no gate")
        ));
        assert_eq!(
            cache.stats().reused_tokens - before.reused_tokens,
            shared as u64
        );
        // another strength (a retry) has no prefix of its own, but the steered rows before it
        // left their unsteered part (layers up to the first steered one, and the residual
        // there): it runs only the later layers over those positions, and leaves its own
        for strength in [4.0, 5.0] {
            let before = cache.stats();
            let stronger = steered_row(strength);
            let got = run(&prompt(5), stronger.clone(), None, Some(&mut cache));
            assert!(same(
                got,
                &run(&prompt(5), stronger.clone(), None, None).expect("no gate")
            ));
            let reused = cache.stats().reused_tokens - before.reused_tokens;
            assert_eq!(
                (cache.stats().lookups - before.lookups, reused),
                (1, shared as u64),
                "chunk {chunk}, strength {strength}"
            );
            // a longer prompt with that prefix resumes the prefix and computes the rest
            let mut longer = prompt(5);
            longer.extend(prompt(8)[60..].iter());
            let got = run(&longer, stronger.clone(), None, Some(&mut cache));
            assert!(same(
                got,
                &run(&longer, stronger, None, None).expect("no gate")
            ));
        }
        // a prompt no steered row has seen resumes nothing
        let before = cache.stats();
        let novel: Vec<u32> = prompt(9).iter().map(|t| t + 1).collect();
        let got = run(&novel, steered_row(6.0), None, Some(&mut cache));
        assert!(same(
            got,
            &run(&novel, steered_row(6.0), None, None).expect("no gate")
        ));
        assert_eq!(cache.stats().hits, before.hits);

        // a gate view: the view and the prompt each reuse their own prefix
        let view = prompt(7)[40..].to_vec();
        let expected = run(&prompt(5), RowContext::default(), None, None).expect("no gate");
        for _ in 0..2 {
            let got = run(
                &prompt(5),
                RowContext::default(),
                Some(gate_at(2, harmless, Some(view.clone()))),
                Some(&mut cache),
            );
            assert!(same(got, &expected), "chunk {chunk}");
        }
    }
}

/// An engine on the fixture with the hook, prefilling 16 tokens at a time.
fn engine(prefix_cache_tokens: usize) -> Engine {
    let model = tiny_model();
    let hidden = model.manifest().hidden_size;
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
    let config = EngineConfig {
        prefix_cache_tokens,
        prefill_chunk_tokens: 16,
        ..EngineConfig::default()
    };
    Engine::start(model, tokenizer, Some(Box::new(hook(hidden))), config).expect("starts")
}

#[test]
fn the_engine_generates_the_same_tokens_with_the_prefix_cache() {
    let generate = |prefix_cache_tokens: usize| {
        let engine = engine(prefix_cache_tokens);
        let out: Vec<Vec<u32>> = (0..4)
            .map(|t| {
                let request = GenerationRequest {
                    prompt: prompt(t),
                    params: greedy(12),
                    row: if t == 3 {
                        steered()
                    } else {
                        RowContext::default()
                    },
                    gate: None,
                    sink: Box::new(|_| std::ops::ControlFlow::Continue(())),
                };
                tokens(&collect_events(&engine, request).expect("queued"))
            })
            .collect();
        (out, engine.kv_usage().prefix_stats())
    };
    let (without, off) = generate(0);
    let (with, on) = generate(2048);
    assert_eq!(with, without);
    assert_eq!(off.lookups, 0);
    // the first request fills the cache, the next two reuse its four blocks, the steered one
    // looks for a steered prefix and finds none
    assert_eq!((on.lookups, on.hits, on.reused_tokens), (4, 2, 2 * 64));
}

#[test]
fn unsteered_prompts_leave_a_resume_point_for_the_next_steered_one() {
    // a steered request (the engine learns where steering starts), a chat's unsteered turns,
    // then the chat turned harmful at a strength no request used: its first steered prefill
    // resumes the history the unsteered turns left, and generates what computing it does
    let generate = |prefix_cache_tokens: usize| {
        let engine = engine(prefix_cache_tokens);
        let requests = [
            (
                prompt(9).iter().map(|t| t + 1).collect::<Vec<_>>(),
                steered(),
            ),
            (prompt(1), RowContext::default()),
            (prompt(2), RowContext::default()),
            (prompt(3), steered_row(5.0)),
        ];
        let mut stats = Vec::new();
        let out: Vec<Vec<u32>> = requests
            .into_iter()
            .map(|(prompt, row)| {
                let request = GenerationRequest {
                    prompt,
                    params: greedy(12),
                    row,
                    gate: None,
                    sink: Box::new(|_| std::ops::ControlFlow::Continue(())),
                };
                let out = tokens(&collect_events(&engine, request).expect("queued"));
                stats.push(engine.kv_usage().prefix_stats());
                out
            })
            .collect();
        (out, stats)
    };
    let (without, _) = generate(0);
    let (with, stats) = generate(2048);
    assert_eq!(with, without);
    // the second unsteered request reuses the first's four blocks; the steered one resumes them
    let reused: Vec<u64> = stats.iter().map(|s| s.reused_tokens).collect();
    assert_eq!(reused, [0, 0, 64, 128]);
}
