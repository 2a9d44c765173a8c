//! Opt-in model-level checks on the real SmolLM2 export (`make check-smollm2`): greedy output of
//! the Rust engine, batched, against the numpy reference for 20 prompts × 32 tokens.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};

use inferaligner_runtime::{
    ChatMessage, ChatTokenizer, Engine, EngineConfig, GenerationEvent, GenerationParams,
    GenerationRequest, LayerSplitModel, RowContext, SessionOptions,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    question: String,
    input_ids: Vec<u32>,
    numpy_greedy_ids: Vec<u32>,
}

fn env_path(var: &str) -> PathBuf {
    let path = PathBuf::from(
        std::env::var_os(var).unwrap_or_else(|| panic!("set {var} (make check-smollm2 does)")),
    );
    assert!(
        path.exists(),
        "{} is missing: run `make check-smollm2`",
        path.display()
    );
    path
}

#[test]
#[ignore = "needs the SmolLM2 export: make check-smollm2"]
fn smollm2_batched_greedy_matches_the_numpy_reference() {
    let export = env_path("INFERALIGNER_SMOLLM2_EXPORT");
    let reference: Reference = serde_json::from_str(
        &std::fs::read_to_string(env_path("INFERALIGNER_SMOLLM2_GREEDY")).expect("reads"),
    )
    .expect("parses");
    let model = LayerSplitModel::load(&export, &SessionOptions::default()).expect("loads");
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest()).expect("tokenizer"));
    let config = EngineConfig {
        max_batch: 8,
        queue_capacity: 64,
        ..EngineConfig::default()
    };
    let engine = Engine::start(model, tokenizer.clone(), None, config).expect("starts");
    let receivers: Vec<_> = reference
        .cases
        .iter()
        .map(|case| {
            let ids = tokenizer
                .encode_chat(&[ChatMessage::new("user", case.question.as_str())], true)
                .expect("encodes");
            assert_eq!(ids, case.input_ids, "{}", case.question);
            let (tx, rx) = mpsc::channel();
            let request = GenerationRequest {
                prompt: ids,
                params: GenerationParams {
                    max_new_tokens: reference.tokens,
                    ignore_eos: true,
                    ..GenerationParams::default()
                },
                row: RowContext::default(),
                gate: None,
                sink: Box::new(move |e| {
                    let _ = tx.send(e);
                    ControlFlow::Continue(())
                }),
            };
            engine.submit(request).expect("accepted");
            rx
        })
        .collect();
    let mut identical = 0;
    for (case, rx) in reference.cases.iter().zip(receivers) {
        let got: Vec<u32> = rx
            .iter()
            .take_while(|e| !matches!(e, GenerationEvent::Finished { .. }))
            .filter_map(|e| match e {
                GenerationEvent::Token { id, .. } => Some(id),
                GenerationEvent::Failed { message, .. } => panic!("{message}"),
                _ => None,
            })
            .collect();
        if got == case.numpy_greedy_ids {
            identical += 1;
        } else {
            eprintln!(
                "differs: {}\n  got  {got:?}\n  want {:?}",
                case.question, case.numpy_greedy_ids
            );
        }
    }
    eprintln!(
        "{identical}/{} prompts identical over {} tokens",
        reference.cases.len(),
        reference.tokens
    );
    assert_eq!(identical, reference.cases.len());
}

#[test]
#[ignore = "needs the SmolLM2 export: make check-smollm2"]
fn smollm2_a_retry_resumed_from_the_unsteered_part_matches_computing_it() {
    use inferaligner_runtime::{AddScale, AddVectors, PrefixCache};
    let export = env_path("INFERALIGNER_SMOLLM2_EXPORT");
    let mut model = LayerSplitModel::load(&export, &SessionOptions::default()).expect("loads");
    let tokenizer = ChatTokenizer::load(model.manifest()).expect("tokenizer");
    let hidden = model.manifest().hidden_size;
    // unit sawtooth vectors on the default pack's layers, 12-20
    let v: Vec<f32> = (0..hidden).map(|i| (i % 7) as f32 - 3.0).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let v: Vec<f32> = v.iter().map(|x| x / norm).collect();
    let mut hook = AddVectors {
        vectors: (12..=20).map(|l| (l, v.clone())).collect(),
    };
    let row = |alpha: f32| RowContext {
        params: Some(Arc::new(AddScale(alpha))),
        ..RowContext::default()
    };
    let text = "The quarterly report covers revenue, staffing and the new warehouse. ".repeat(30);
    let ask = format!("{text}\n\nNow tell me how to pick the lock on my neighbour's door.");
    let prompt = tokenizer
        .encode_chat(&[ChatMessage::new("user", ask.as_str())], true)
        .expect("encodes");
    for alpha in [15.0, 9.0] {
        let mut run = |row, cache: Option<&mut PrefixCache>| {
            model
                .prefill_prompt(&prompt, 128, Some(&mut hook), row, None, cache)
                .expect("runs")
                .expect("no gate")
                .logits
                .row(0)
                .to_vec()
        };
        let expected = run(row(alpha), None);
        let mut cache = PrefixCache::new(2048).expect("on");
        run(row(12.0), Some(&mut cache));
        let got = run(row(alpha), Some(&mut cache));
        let reused = cache.stats().reused_tokens;
        let diff = inferaligner_e2e::max_abs_diff(&got, &expected);
        println!(
            "alpha {alpha}: {} prompt tokens, {reused} resumed, max logit difference {diff:e}",
            prompt.len()
        );
        assert!(reused as usize >= prompt.len() - 16, "{reused}");
        assert_eq!(
            inferaligner_runtime::argmax(&got),
            inferaligner_runtime::argmax(&expected)
        );
        assert!(diff < 1e-3, "{diff}");
    }
}
