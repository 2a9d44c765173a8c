//! Traces of the sidecar reach an OTLP collector (wiremock), decoded from the protobuf.
//!
//! Its own test binary: it installs a process-wide tracing subscriber, which the other tests
//! must not share (a thread-local one lost spans when other tests ran beside it).

use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[test]
fn gate_spans_reach_an_otlp_collector_and_prompts_stay_private() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let collector = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/v1/traces"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&collector)
            .await;
        let endpoint = format!("{}/v1/traces", collector.uri());
        let provider =
            inferaligner::telemetry::tracer_provider(Some(&endpoint)).expect("exporter builds");
        // Spans to the collector, and every log line at every level into `logs`.
        let logs = Logs::default();
        let subscriber = tracing_subscriber::registry()
            .with(inferaligner::telemetry::otel_layer(&provider))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(logs.clone())
                    .with_filter(tracing_subscriber::filter::LevelFilter::TRACE),
            );
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let h = start(config(ServeMode::Local, "http://127.0.0.1:1")).await;
        let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
        let mut flagged = chat(HARMFUL);
        flagged["safety_identifier"] = "user-7f3a".into();
        let a = post(
            &h,
            "/v1/chat/completions",
            flagged.to_string(),
            &[("traceparent", traceparent.as_str())],
        )
        .await;
        assert_eq!(a.status, 200);
        const CANARY: &str = "zebra-canary-4711";
        let canary = ask(&h, &chat(&format!("Tell me about {CANARY}.")), None).await;
        assert_eq!(canary.status, 200);
        // Opting in records prompts in the spans.
        let mut opted_in = config(ServeMode::Local, "http://127.0.0.1:1");
        opted_in.trace.record_content = true;
        let h2 = start(opted_in).await;
        const RECORDED: &str = "okapi-canary-0815";
        assert_eq!(ask(&h2, &chat(RECORDED), None).await.status, 200);
        // The exporter's blocking client needs this thread free to run the collector.
        let provider = std::sync::Arc::new(provider);
        let flusher = provider.clone();
        tokio::task::spawn_blocking(move || flusher.force_flush())
            .await
            .expect("joins")
            .expect("flushes");
        let mut spans = Vec::new();
        for request in collector.received_requests().await.expect("recorded") {
            let export =
                ExportTraceServiceRequest::decode(request.body.as_slice()).expect("OTLP protobuf");
            for rs in export.resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
        }
        let attr = |span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value)
                .map(|v| format!("{v:?}"))
                .unwrap_or_default()
        };
        let names: Vec<_> = spans.iter().map(|s| s.name.clone()).collect();
        let gate = spans
            .iter()
            .find(|s| s.name == "gate")
            .unwrap_or_else(|| panic!("no gate span among {names:?}"));
        assert!(attr(gate, "inferaligner.decision").contains("harmful"));
        assert!(attr(gate, "inferaligner.action").contains("steer"));
        {
            use opentelemetry_proto::tonic::common::v1::any_value::Value;
            let exactly = |v: Value| format!("{v:?}");
            assert_eq!(
                attr(gate, "inferaligner.gate_layer"),
                exactly(Value::IntValue(GATE_LAYER as i64))
            );
            assert_eq!(
                attr(gate, "inferaligner.alpha"),
                exactly(Value::DoubleValue(8.0))
            );
            assert_eq!(
                attr(gate, "inferaligner.steered_layers"),
                exactly(Value::StringValue("[1, 2]".into()))
            );
        }
        assert!(!attr(gate, "inferaligner.score").is_empty());
        let request = spans
            .iter()
            .find(|s| s.name == "chat")
            .expect("the request span");
        assert_eq!(
            gate.parent_span_id, request.span_id,
            "gate is a child of the request"
        );
        assert_eq!(
            hex(&request.trace_id),
            caller_trace,
            "the caller's trace continues"
        );
        let tokens = a.json()["usage"]["completion_tokens"]
            .as_i64()
            .expect("usage");
        assert_eq!(
            attr(request, "gen_ai.usage.output_tokens"),
            format!(
                "{:?}",
                opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(tokens)
            )
        );
        assert!(attr(request, "inferaligner.policy").contains("default"));
        assert!(
            attr(request, "user.id").contains("user-7f3a"),
            "the end user of a flagged request can be found"
        );
        let logged = logs.text();
        assert!(
            logged.contains("\"message\":\"ready\""),
            "logs were captured"
        );
        assert!(
            !logged.contains(CANARY),
            "prompts are not logged by default"
        );
        let everywhere = format!("{:?}", spans);
        assert!(
            !everywhere.contains(CANARY),
            "prompts are not traced by default"
        );
        assert!(
            spans
                .iter()
                .any(|s| attr(s, "gen_ai.prompt").contains(RECORDED)),
            "record_content = true records the prompt"
        );
        assert!(
            attr(request, "gen_ai.prompt").is_empty(),
            "prompts are not recorded by default"
        );
        assert!(
            spans
                .iter()
                .any(|s| s.name == "generate" && s.parent_span_id == request.span_id)
        );
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Log lines written by the fmt layer, kept in memory.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("not poisoned")).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
