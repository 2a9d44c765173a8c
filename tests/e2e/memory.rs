//! Bounded memory on the tiny fixture: chunked prefill equals one pass, and the engine's KV
//! budget admits, holds back or refuses requests.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use inferaligner_e2e::{greedy, max_abs_diff, sawtooth_hook, steered_row, tiny_model};
use inferaligner_runtime::{
    AddVectors, AfterGate, ChatTokenizer, EarlyExit, Engine, EngineConfig, FinishReason,
    GenerationEvent, GenerationRequest, LayerHook, LayerSplitModel, Prefilled, RowContext,
    collect_events,
};
use ndarray::Array2;

/// A prompt of `n` tokens that is not a repetition of a few ids.
fn prompt(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 37 % 290) as u32 + 3).collect()
}

fn hook() -> AddVectors {
    sawtooth_hook(tiny_model().manifest().hidden_size, 9)
}

fn steered() -> RowContext {
    steered_row(3.0)
}

/// Every layer's K and V of the filled slots of row 0.
fn kv_contents(p: &Prefilled, layers: usize) -> Vec<f32> {
    let fill = p.cache.fill()[0];
    (0..layers)
        .flat_map(|l| {
            let (k, v) = p.cache.layer(l);
            let s = ndarray::s![0, .., ..fill, ..];
            k.slice(s)
                .iter()
                .chain(v.slice(s).iter())
                .copied()
                .collect::<Vec<_>>()
        })
        .collect()
}

fn gate_at(layer: usize, verdict: fn() -> AfterGate) -> EarlyExit {
    EarlyExit {
        view: None,
        after_layer: layer,
        mean_from: None,
        more_views: Vec::new(),
        decide: Box::new(move |_: &[f32]| verdict()),
    }
}

#[test]
fn chunked_prefill_equals_one_pass() {
    let mut model = tiny_model();
    let layers = model.manifest().num_layers;
    let ids = prompt(150);
    let mut hook = hook();
    let one_pass = |model: &mut LayerSplitModel, row: &RowContext, hook: &mut AddVectors| {
        let input = Array2::from_shape_fn((1, ids.len()), |(_, i)| i64::from(ids[i]));
        let mut cache = model.new_cache_rows(1);
        let rows = std::slice::from_ref(row);
        let logits = model
            .step(&input, &mut cache, Some(hook as &mut dyn LayerHook), rows)
            .expect("runs");
        (logits.row(0).to_vec(), cache.fill().to_vec())
    };
    let plain = one_pass(&mut model, &RowContext::default(), &mut hook);
    let steered_logits = one_pass(&mut model, &steered(), &mut hook);
    assert!(
        max_abs_diff(&plain.0, &steered_logits.0) > 1e-2,
        "the hook steers"
    );

    let reference = model
        .prefill_prompt(
            &ids,
            ids.len(),
            Some(&mut hook),
            RowContext::default(),
            None,
            None,
        )
        .expect("runs")
        .expect("no gate");
    for chunk in [1, 7, 64, 149, 150, 1000] {
        for (row, expected) in [
            (RowContext::default(), &plain),
            (steered(), &steered_logits),
        ] {
            let p = model
                .prefill_prompt(&ids, chunk, Some(&mut hook), row, None, None)
                .expect("runs")
                .expect("no gate");
            let diff = max_abs_diff(p.logits.row(0).as_slice().expect("contiguous"), &expected.0);
            assert!(diff < 1e-4, "chunk {chunk}: logits differ by {diff}");
            assert_eq!(p.cache.fill(), &expected.1[..]);
        }
        let p = model
            .prefill_prompt(
                &ids,
                chunk,
                Some(&mut hook),
                RowContext::default(),
                None,
                None,
            )
            .expect("runs")
            .expect("no gate");
        let diff = max_abs_diff(&kv_contents(&p, layers), &kv_contents(&reference, layers));
        assert!(diff < 1e-4, "chunk {chunk}: KV differs by {diff}");
    }
}

#[test]
fn chunked_prefill_with_a_gate_resumes_or_recomputes() {
    let mut model = tiny_model();
    let ids = prompt(130);
    let mut hook = hook();
    let mut run = |row: RowContext, gate: Option<EarlyExit>, chunk: usize| {
        model
            .prefill_prompt(&ids, chunk, Some(&mut hook), row, gate, None)
            .expect("runs")
            .map(|p| p.logits.row(0).to_vec())
    };
    let plain = run(RowContext::default(), None, 1000).expect("no gate");
    let steered_logits = run(steered(), None, 1000).expect("no gate");
    let harmless = || AfterGate::Generate(RowContext::default());
    let harmful = || AfterGate::Generate(steered());
    for chunk in [5, 64, 1000] {
        // gate after layer 2; the hook steers layers 1 and 3
        let resumed = run(RowContext::default(), Some(gate_at(2, harmless)), chunk).expect("go");
        assert!(max_abs_diff(&resumed, &plain) < 1e-4, "chunk {chunk}");
        let recomputed = run(RowContext::default(), Some(gate_at(2, harmful)), chunk).expect("go");
        assert!(
            max_abs_diff(&recomputed, &steered_logits) < 1e-4,
            "chunk {chunk}"
        );
        // gate after layer 0: steering starts after it, so the kept residuals are resumed
        let later = run(RowContext::default(), Some(gate_at(0, harmful)), chunk).expect("go");
        assert!(
            max_abs_diff(&later, &steered_logits) < 1e-4,
            "chunk {chunk}"
        );
        assert_eq!(
            run(
                RowContext::default(),
                Some(gate_at(2, || AfterGate::End)),
                chunk
            ),
            None
        );
    }
}

#[test]
fn the_gate_reads_the_same_residual_chunked_or_not() {
    let mut model = tiny_model();
    let ids = prompt(100);
    let seen = Arc::new(Mutex::new(Vec::new()));
    for chunk in [3, 1000] {
        let seen = seen.clone();
        let gate = EarlyExit {
            view: None,
            after_layer: 2,
            mean_from: None,
            more_views: Vec::new(),
            decide: Box::new(move |r: &[f32]| {
                seen.lock().expect("lock").push(r.to_vec());
                AfterGate::End
            }),
        };
        model
            .prefill_prompt(&ids, chunk, None, RowContext::default(), Some(gate), None)
            .expect("runs");
    }
    let seen = seen.lock().expect("lock");
    assert!(max_abs_diff(&seen[0], &seen[1]) < 1e-5);
}

fn engine(config: EngineConfig) -> Engine {
    let model = tiny_model();
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
    Engine::start(model, tokenizer, Some(Box::new(hook())), config).expect("starts")
}

/// Submit all requests at once; returns the order events arrived in (request index, event),
/// and the largest KV reservation and allocation the engine reported while they ran.
fn run_together(
    engine: &Engine,
    prompts: &[(Vec<u32>, usize)],
) -> (Vec<(usize, GenerationEvent)>, usize, usize) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let peaks = Arc::new(Mutex::new((0, 0)));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (i, (ids, max_new)) in prompts.iter().enumerate() {
        let (log, peaks, done, kv) = (
            log.clone(),
            peaks.clone(),
            done_tx.clone(),
            engine.kv_usage(),
        );
        let request = GenerationRequest {
            prompt: ids.clone(),
            params: greedy(*max_new),
            row: RowContext::default(),
            gate: None,
            sink: Box::new(move |event| {
                let mut p = peaks.lock().expect("lock");
                *p = (p.0.max(kv.reserved_tokens()), p.1.max(kv.bytes()));
                let last = matches!(
                    event,
                    GenerationEvent::Finished { .. } | GenerationEvent::Failed { .. }
                );
                log.lock().expect("lock").push((i, event));
                if last {
                    let _ = done.send(());
                }
                ControlFlow::Continue(())
            }),
        };
        engine.submit(request).expect("queued");
    }
    for _ in prompts {
        done_rx.recv().expect("every request ends");
    }
    let events = log.lock().expect("lock").clone();
    let (reserved, bytes) = *peaks.lock().expect("lock");
    (events, reserved, bytes)
}

fn tokens_of(events: &[(usize, GenerationEvent)], i: usize) -> Vec<u32> {
    events
        .iter()
        .filter_map(|(j, e)| match e {
            GenerationEvent::Token { id, .. } if *j == i => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn the_kv_budget_holds_requests_back_until_rows_leave() {
    let work = [(prompt(90), 20), (prompt(70), 20), (prompt(40), 10)];
    let roomy = engine(EngineConfig::default());
    let (together, _, _) = run_together(&roomy, &work);
    // With room for all, the rows decode together: their tokens interleave.
    let first_end = together
        .iter()
        .position(|(_, e)| matches!(e, GenerationEvent::Finished { .. }))
        .expect("ends");
    assert!(
        together[..first_end]
            .iter()
            .any(|(i, _)| *i != together[0].0)
    );

    // 90 + 20 tokens take 128 slots: a budget of 200 holds one such row at a time.
    let budget = 200;
    let tight = engine(EngineConfig {
        max_kv_tokens: budget,
        ..EngineConfig::default()
    });
    let (alone, reserved, bytes) = run_together(&tight, &work);
    let order: Vec<usize> = alone.iter().map(|(i, _)| *i).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "one request at a time, in arrival order");
    for i in 0..work.len() {
        assert_eq!(tokens_of(&alone, i), tokens_of(&together, i), "request {i}");
    }
    let kv = tight.kv_usage();
    assert!(
        reserved > 0 && reserved <= budget,
        "reserved {reserved} slots"
    );
    let per_token = tiny_model().manifest().kv_bytes_per_token();
    assert!(
        bytes > 0 && bytes <= budget * per_token,
        "{bytes} bytes held"
    );
    assert_eq!(kv.budget_bytes(), budget * per_token);
    assert_eq!((kv.reserved_tokens(), kv.bytes()), (0, 0), "all given back");
}

#[test]
fn a_request_over_the_whole_budget_is_refused_clearly() {
    let engine = engine(EngineConfig {
        max_kv_tokens: 128,
        ..EngineConfig::default()
    });
    let request = |n: usize, max_new: usize| GenerationRequest {
        prompt: prompt(n),
        params: greedy(max_new),
        row: RowContext::default(),
        gate: None,
        sink: Box::new(|_| ControlFlow::Continue(())),
    };
    let events = collect_events(&engine, request(120, 20)).expect("queued");
    let Some(GenerationEvent::Failed { kind, message, .. }) = events.last() else {
        panic!("{events:?}")
    };
    assert_eq!(*kind, inferaligner_runtime::ErrorKind::Input);
    assert!(message.contains("max_kv_tokens"), "{message}");
    // the engine goes on serving what fits
    let events = collect_events(&engine, request(100, 20)).expect("queued");
    assert!(matches!(
        events.last(),
        Some(GenerationEvent::Finished {
            reason: FinishReason::Length,
            ..
        })
    ));
}

#[test]
fn the_engine_prefills_in_chunks_with_the_same_tokens() {
    let ids = prompt(120);
    let run = |chunk: usize| {
        let engine = engine(EngineConfig {
            prefill_chunk_tokens: chunk,
            ..EngineConfig::default()
        });
        let mut r = GenerationRequest {
            prompt: ids.clone(),
            params: greedy(12),
            row: steered(),
            gate: None,
            sink: Box::new(|_| ControlFlow::Continue(())),
        };
        r.gate = Some(gate_at(2, || AfterGate::Generate(steered())));
        let events = collect_events(&engine, r).expect("queued");
        tokens_of(&events.into_iter().map(|e| (0, e)).collect::<Vec<_>>(), 0)
    };
    let one_pass = run(10_000);
    assert_eq!(one_pass.len(), 12);
    assert_eq!(run(16), one_pass);
    assert_eq!(run(1), one_pass);
}

#[test]
fn a_long_prefill_does_not_stall_the_streams_in_flight() {
    // chunks of 8: the 200-token prompt takes 25 chunks, and the engine decodes the running
    // row between them instead of after all of them
    let engine = engine(EngineConfig {
        prefill_chunk_tokens: 8,
        ..EngineConfig::default()
    });
    let work = [(prompt(5), 40), (prompt(200), 4)];
    let (events, _, _) = run_together(&engine, &work);
    let first_long = events
        .iter()
        .position(|(i, e)| *i == 1 && matches!(e, GenerationEvent::Token { .. }))
        .expect("the long request answers");
    let short_before = events[..first_long]
        .iter()
        .filter(|(i, e)| *i == 0 && matches!(e, GenerationEvent::Token { .. }))
        .count();
    assert!(
        short_before >= 20,
        "{short_before} tokens of the running stream before the long prompt's first"
    );
    // and interleaving changes no token
    let alone = |k: usize| run_together(&engine, &work[k..=k]).0;
    assert_eq!(tokens_of(&events, 0), tokens_of(&alone(0), 0));
    assert_eq!(tokens_of(&events, 1), tokens_of(&alone(1), 0));
}
