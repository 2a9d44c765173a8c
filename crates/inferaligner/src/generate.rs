//! `inferaligner generate`: one request through the engine, steered as the sidecar would,
//! streamed to a terminal.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use inferaligner_core::{Action, GateView, Policy, SamplingParams};
use inferaligner_proxy::{GateReport, Message, Prompt};
use inferaligner_runtime::{
    ChatTokenizer, Engine, EngineConfig, EventSink, GenerationEvent, GenerationParams,
    GenerationRequest, LayerSplitModel, RowContext,
};

use crate::cli::GenerateArgs;
use crate::{steering, view};

/// Stream an answer to `out`; a summary line goes to stderr.
pub fn generate(args: &GenerateArgs, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let model = LayerSplitModel::load(&args.model, &args.runtime.session_options())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = Arc::new(ChatTokenizer::load(model.manifest())?);
    let prompt = if args.raw || !tokenizer.has_chat_template() {
        Prompt::Text(args.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new("system", system.as_str()));
        }
        messages.push(Message::new("user", args.prompt.as_str()));
        Prompt::Chat(messages)
    };
    let steering = match &args.pack {
        Some(path) => Some(steering::Steering::load(
            path,
            model.manifest(),
            Policy {
                mode: args.policy,
                steered_answers: args.steered_answers,
                alpha: args.alpha,
                offset: args.offset,
                ..Policy::default()
            },
        )?),
        None => None,
    };
    let engine = Engine::start(
        model,
        tokenizer,
        Some(steering::hook()),
        EngineConfig::default(),
    )?;
    let loaded = started.elapsed();
    let view = steering
        .as_ref()
        .map_or(GateView::Prompt, |s| s.pack.metadata.gate_view);
    let view::Rendered {
        tokens,
        gate_views,
        context_views,
        ..
    } = view::render(engine.tokenizer(), &prompt, view)?;
    let (decision_tx, decision_rx) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    let sink: EventSink = Box::new(move |e| match tx.send(e) {
        Ok(()) => ControlFlow::Continue(()),
        Err(_) => ControlFlow::Break(()),
    });
    let params = GenerationParams {
        max_new_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            ..SamplingParams::default()
        },
        ..GenerationParams::default()
    };
    let (gate, sink) = match &steering {
        Some(s) => {
            let read = (engine.tokenizer(), tokens.as_slice());
            let report = move |report: GateReport| {
                let _ = decision_tx.send(report.decision);
            };
            let held = steering::Held::default();
            let retry = steering::Retry {
                submitter: engine.follow_ups(),
                prompt: tokens.clone(),
                params: params.clone(),
                max_written_tokens: params.max_new_tokens,
            };
            let (exit, sink) = s.gate(
                (s.policy.gate_views(gate_views, context_views), None),
                false,
                read,
                report,
                (sink, &held),
                Some(retry),
            );
            (Some(exit), sink)
        }
        None => (None, sink),
    };
    let request = GenerationRequest {
        prompt: tokens,
        params,
        row: RowContext::default(),
        gate,
        sink,
    };
    let generating = Instant::now();
    let mut first_token = None;
    if engine.submit(request).is_err() {
        bail!("the engine refused the request");
    }
    let mut checked_gate = steering.is_none();
    for event in rx {
        if !checked_gate {
            checked_gate = true;
            if let (Ok(d), Some(s)) = (decision_rx.try_recv(), steering.as_ref()) {
                eprintln!(
                    "[gate at layer {}: {} (score {:+.3}) → {}]",
                    s.pack.metadata.gate_layer,
                    if d.harmful { "harmful" } else { "harmless" },
                    d.score,
                    d.action.as_str()
                );
                if d.action == Action::Block {
                    writeln!(out, "{}", s.policy.refusal)?;
                    return Ok(());
                }
            }
        }
        match event {
            GenerationEvent::Token { text, .. } => {
                first_token.get_or_insert_with(|| generating.elapsed());
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            GenerationEvent::Finished {
                reason,
                usage,
                tail,
            } => {
                writeln!(out, "{tail}")?;
                let total = generating.elapsed().as_secs_f64();
                let first = first_token.unwrap_or_default().as_secs_f64();
                let decode_tps =
                    (usage.completion_tokens.saturating_sub(1)) as f64 / (total - first).max(1e-9);
                eprintln!(
                    "[{reason:?}: {} prompt + {} generated tokens; load {:.2} s, first token \
                     {:.0} ms, decode {:.1} tok/s]",
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    loaded.as_secs_f64(),
                    first * 1e3,
                    decode_tps
                );
                return Ok(());
            }
            GenerationEvent::Failed { message, .. } => bail!("{message}"),
            // not asked for
            GenerationEvent::PromptLogprobs(_) => {}
        }
    }
    bail!("the engine stopped without finishing the request")
}
