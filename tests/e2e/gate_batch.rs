//! Batched gating on the tiny fixture: the gate-phase chunks of several prefills run as one
//! padded batch, and each request's gate reads the activation (last token or mean), and its
//! prompt ends with the logits, that it gets alone — whatever the decision, with or without the prefix cache.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use inferaligner_e2e::{
    fixture_model, greedy, max_abs_diff, sawtooth_hook, steered_row, tiny_llama_fused, tiny_model,
    tokens,
};
use inferaligner_runtime::{
    AddVectors, AfterGate, ChatTokenizer, ChunkedPrefill, EarlyExit, Engine, EngineConfig,
    GenerationEvent, GenerationRequest, LayerHook, PrefillStep, PrefixCache, RowContext,
    collect_events,
};

/// The hook steers layers 1 and 3 of the fixture's 4.
fn hook(hidden: usize) -> AddVectors {
    sawtooth_hook(hidden, 5)
}

fn steered() -> RowContext {
    steered_row(3.0)
}

/// Prompts of different lengths (one spans several chunks) sharing a 40-token start.
fn prompts() -> Vec<Vec<u32>> {
    [3usize, 17, 29, 90]
        .iter()
        .enumerate()
        .map(|(k, &tail)| {
            let start = (0..40).map(|i| (i * 37 % 290) as u32 + 3);
            start
                .chain((0..tail).map(|i| ((i * 13 + k * 71) % 290) as u32 + 3))
                .collect()
        })
        .collect()
}

/// The decision for prompt `k`: end, generate unsteered, or steer.
fn verdict(k: usize) -> AfterGate {
    match k % 3 {
        0 => AfterGate::End,
        1 => AfterGate::Generate(RowContext::default()),
        _ => AfterGate::Generate(steered()),
    }
}

/// A gate after layer 2 that records the activation it reads: the last token's residual, or
/// for odd `k` the mean from inside the shared start (the cache may reuse only before it).
fn gate(k: usize, seen: &Seen) -> EarlyExit {
    let seen = seen.clone();
    EarlyExit {
        view: None,
        after_layer: 2,
        mean_from: (k % 2 == 1).then_some(20 + k),
        more_views: Vec::new(),
        decide: Box::new(move |r: &[f32]| {
            seen.lock().expect("lock").push((k, r.to_vec()));
            verdict(k)
        }),
    }
}

type Seen = Arc<Mutex<Vec<(usize, Vec<f32>)>>>;

/// Each prompt's gate residual and final logits (`None`: ended at the gate).
fn outcomes(seen: &Seen, logits: Vec<Option<Vec<f32>>>) -> Vec<(Vec<f32>, Option<Vec<f32>>)> {
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort_by_key(|(k, _)| *k);
    seen.into_iter().map(|(_, r)| r).zip(logits).collect()
}

fn assert_close(a: &[(Vec<f32>, Option<Vec<f32>>)], b: &[(Vec<f32>, Option<Vec<f32>>)]) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(max_abs_diff(&x.0, &y.0) < 1e-4, "prompt {k}: gate residual");
        assert_eq!(x.1.is_some(), y.1.is_some(), "prompt {k}: decision");
        if let (Some(l), Some(m)) = (&x.1, &y.1) {
            assert!(max_abs_diff(l, m) < 1e-4, "prompt {k}: logits");
        }
    }
}

#[test]
fn gate_chunks_run_together_give_what_they_give_alone() {
    // the plain export batches rows whatever they hold: several chunks a prompt, with and
    // without cached prefixes
    together_and_alone(tiny_model(), 32, &[false, true], 3);
}

#[test]
fn fused_exports_batch_rows_that_start_from_an_empty_cache() {
    // GroupQueryAttention takes right-padded rows only as their first prompt: one chunk each,
    // nothing cached
    let fused = || fixture_model(&tiny_llama_fused());
    together_and_alone(fused(), 256, &[false], 1);
    // over cached tokens, it fails: such rows are not batched (the engine runs them alone)
    let mut model = fused();
    let prompts = prompts();
    let mut cache = PrefixCache::new(1024);
    let seen = Seen::default();
    let mut prefills: Vec<ChunkedPrefill> = (0..2)
        .map(|k| {
            ChunkedPrefill::new(
                &model,
                &prompts[k],
                32,
                RowContext::default(),
                Some(gate(k, &seen)),
            )
            .expect("valid")
        })
        .collect();
    let mut refs: Vec<&mut ChunkedPrefill> = prefills.iter_mut().collect();
    // the first chunks, from empty caches, run together
    assert!(ChunkedPrefill::step_gates(&mut refs, &mut model, None, cache.as_mut()).is_ok());
    // the second ones go on from the first's tokens
    let refused = ChunkedPrefill::step_gates(&mut refs, &mut model, None, cache.as_mut());
    assert!(
        refused.is_err_and(|e| e.to_string().contains("over cached tokens")),
        "rows over a cache are refused"
    );
}

/// Run `prompts()` with a gate each, alone and with their gate phases batched (`chunk` tokens
/// a chunk, without and with the prefix cache as `cached` lists), and check each request gets
/// the same gate activation and logits both ways, in at least `batched` batched steps.
fn together_and_alone(
    mut model: inferaligner_runtime::LayerSplitModel,
    chunk: usize,
    cached: &[bool],
    batched: usize,
) {
    let mut hook = hook(model.manifest().hidden_size);
    let prompts = prompts();
    for &cached in cached {
        let mut cache = PrefixCache::new(1024);
        let mut cache = cache.as_mut().filter(|_| cached);
        // alone
        let seen = Seen::default();
        let alone: Vec<_> = (0..prompts.len())
            .map(|k| {
                model
                    .prefill_prompt(
                        &prompts[k],
                        chunk,
                        Some(&mut hook),
                        RowContext::default(),
                        Some(gate(k, &seen)),
                        cache.as_deref_mut(),
                    )
                    .expect("runs")
                    .map(|p| p.logits.row(0).to_vec())
            })
            .collect();
        let alone = outcomes(&seen, alone);

        // together: the gate phase batched, the rest one by one as the engine does
        let seen = Seen::default();
        let mut prefills: Vec<ChunkedPrefill> = (0..prompts.len())
            .map(|k| {
                ChunkedPrefill::new(
                    &model,
                    &prompts[k],
                    chunk,
                    RowContext::default(),
                    Some(gate(k, &seen)),
                )
                .expect("valid")
            })
            .collect();
        let mut logits: Vec<Option<Vec<f32>>> = vec![None; prompts.len()];
        let mut running: Vec<usize> = (0..prompts.len()).collect();
        let mut batched_steps = 0;
        while !running.is_empty() {
            let gating: Vec<usize> = running
                .iter()
                .copied()
                .filter(|&k| prefills[k].gate_layer().is_some())
                .collect();
            let finished: Vec<(usize, PrefillStep)> = if gating.len() >= 2 {
                batched_steps += 1;
                let mut refs: Vec<&mut ChunkedPrefill> = prefills
                    .iter_mut()
                    .enumerate()
                    .filter(|(k, _)| gating.contains(k))
                    .map(|(_, p)| p)
                    .collect();
                let steps = ChunkedPrefill::step_gates(
                    &mut refs,
                    &mut model,
                    Some(&hook),
                    cache.as_deref_mut(),
                )
                .expect("runs");
                gating.into_iter().zip(steps).collect()
            } else {
                let k = running[0];
                let step = prefills[k]
                    .step(&mut model, Some(&mut hook), cache.as_deref_mut())
                    .expect("runs");
                vec![(k, step)]
            };
            for (k, step) in finished {
                match step {
                    PrefillStep::Running => {}
                    PrefillStep::Ended => running.retain(|&r| r != k),
                    PrefillStep::Done(p) => {
                        logits[k] = Some(p.logits.row(0).to_vec());
                        running.retain(|&r| r != k);
                    }
                }
            }
        }
        // the 90-token tail spans several gate chunks, batched with the others' (after the
        // runs alone, the cache holds nearly every prompt: one chunk each is left)
        assert!(
            batched_steps >= if cached { 1 } else { batched },
            "{batched_steps}"
        );
        assert_close(&outcomes(&seen, logits), &alone);
    }
}

/// The steering hook, held up at its first call until `release` fires, so that requests
/// submitted meanwhile are queued when the engine goes on, and admitted together.
struct HeldHook {
    inner: AddVectors,
    release: Option<std::sync::mpsc::Receiver<()>>,
}

impl LayerHook for HeldHook {
    fn after_layers(
        &mut self,
        layers: std::ops::RangeInclusive<usize>,
        residual: ndarray::ArrayViewMut3<'_, f32>,
        rows: &[RowContext],
    ) {
        if let Some(release) = self.release.take() {
            let _ = release.recv();
        }
        self.inner.after_layers(layers, residual, rows);
    }

    fn first_modified_layer(&self, row: &RowContext) -> Option<usize> {
        self.inner.first_modified_layer(row)
    }
}

#[test]
fn the_engine_gates_concurrent_requests_as_it_gates_one() {
    engine_gates_concurrent_requests_as_one(tiny_model, EngineConfig::default(), (1, 3));
}

#[test]
fn the_engine_batches_fused_gates_of_requests_with_nothing_cached() {
    // without the prefix cache every request starts from an empty cache, so a fused export's
    // gate phases batch as the plain one's do
    let fused = || fixture_model(&tiny_llama_fused());
    let config = EngineConfig {
        prefix_cache_tokens: 0,
        ..EngineConfig::default()
    };
    engine_gates_concurrent_requests_as_one(fused, config, (1, 3));
    // with it, each request starts from the prompts' shared start, cached: they run alone
    engine_gates_concurrent_requests_as_one(fused, EngineConfig::default(), (0, 0));
}

/// Concurrent gated requests (`prompts()`, each with its own decision) give the tokens and
/// gate activations they give one at a time, in `batches` (gate batches, requests in them).
fn engine_gates_concurrent_requests_as_one(
    model: impl Fn() -> inferaligner_runtime::LayerSplitModel,
    config: EngineConfig,
    batches: (u64, u64),
) {
    let generate = |together: bool| {
        let model = model();
        let hidden = model.manifest().hidden_size;
        let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
        // chunks of 256: the three shorter prompts' gate phases fit one batch together
        let config = EngineConfig {
            prefill_chunk_tokens: 256,
            ..config.clone()
        };
        let (release, held) = std::sync::mpsc::channel();
        let hook = HeldHook {
            inner: hook(hidden),
            release: together.then_some(held),
        };
        let engine = Engine::start(model, tokenizer, Some(Box::new(hook)), config).expect("starts");
        if together {
            // an ungated request whose prefill holds the engine until every request is queued
            let blocker = GenerationRequest {
                prompt: prompts()[0].clone(),
                params: greedy(1),
                row: RowContext::default(),
                gate: None,
                sink: Box::new(|_| ControlFlow::Continue(())),
            };
            engine.submit(blocker).expect("queued");
        }
        let seen = Seen::default();
        let request = |k: usize, sink| GenerationRequest {
            prompt: prompts()[k].clone(),
            params: greedy(8),
            row: RowContext::default(),
            gate: Some(gate(k, &seen)),
            sink,
        };
        let n = prompts().len();
        let out: Vec<Vec<u32>> = if together {
            let log = Arc::new(Mutex::new(vec![Vec::new(); n]));
            let (done_tx, done_rx) = std::sync::mpsc::channel();
            for k in 0..n {
                let (log, done) = (log.clone(), done_tx.clone());
                let sink = Box::new(move |event: GenerationEvent| {
                    let last = !matches!(event, GenerationEvent::Token { .. });
                    log.lock().expect("lock")[k].push(event);
                    if last {
                        let _ = done.send(());
                    }
                    ControlFlow::Continue(())
                });
                engine.submit(request(k, sink)).expect("queued");
            }
            release.send(()).expect("the engine holds the hook");
            (0..n).for_each(|_| done_rx.recv().expect("every request ends"));
            let log = log.lock().expect("lock");
            log.iter().map(|events| tokens(events)).collect()
        } else {
            (0..n)
                .map(|k| {
                    let sink = Box::new(|_| ControlFlow::Continue(()));
                    tokens(&collect_events(&engine, request(k, sink)).expect("queued"))
                })
                .collect()
        };
        let mut seen = seen.lock().expect("lock").clone();
        seen.sort_by_key(|(k, _)| *k);
        (out, seen, engine.kv_usage().gate_batches())
    };
    let (one_by_one, seen_alone, alone) = generate(false);
    let (together, seen_together, batched) = generate(true);
    assert_eq!(alone, (0, 0));
    // the three shorter prompts (43, 57, 69 tokens) gated in one chunk together where they
    // batch; the longest (130) does not fit beside them in 256 tokens
    assert_eq!(batched, batches);
    assert_eq!(together, one_by_one);
    for ((_, a), (_, b)) in seen_alone.iter().zip(&seen_together) {
        assert!(max_abs_diff(a, b) < 1e-4);
    }
    assert!(one_by_one[0].is_empty() && !one_by_one[1].is_empty());
}
