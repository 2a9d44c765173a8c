//! `/v1/completions` with several prompts. Each prompt is answered as a request of its own —
//! with an admission permit of its own, gated, then forwarded, blocked, steered or generated —
//! and the answers are merged into one, as OpenAI's legacy API and vLLM answer a prompt list:
//! prompt p's choices at indexes p·n to p·n + n − 1, `usage` summed, one `[DONE]`. The decision
//! headers are those of the prompt the gate scored highest; the first prompt whose answer is an
//! error answers the whole request with it (the others are cancelled).

use super::*;

impl Sidecar {
    pub(super) async fn batch(
        self: &Arc<Self>,
        (mut parts, bodies): (http::request::Parts, Vec<Bytes>),
        guard: RequestGuard,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let most = self.config.server.max_concurrent_requests;
        if bodies.len() > most {
            return Err(ProxyError::invalid(
                format!(
                    "{} prompts in one request; at most {most} are accepted \
                     (server.max_concurrent_requests)",
                    bodies.len()
                ),
                Some("prompt"),
            ));
        }
        // each prompt holds a permit while it is answered, as a request of its own would
        let mut guards = vec![guard];
        for _ in 1..bodies.len() {
            guards.push(self.admit_guard()?);
        }
        let choices = serde_json::from_slice::<Value>(&bodies[0])
            .ok()
            .and_then(|v| v.get("n").and_then(Value::as_u64))
            .map_or(1, |n| n as usize);
        // the answers are merged here, so they must come uncompressed
        parts.headers.remove(header::ACCEPT_ENCODING);
        let mut running = Vec::with_capacity(bodies.len());
        for (p, (raw, guard)) in bodies.into_iter().zip(guards).enumerate() {
            let sidecar = self.clone();
            let parts = parts.clone();
            let span = prompt_span(p);
            running.push(tokio::spawn(
                async move {
                    let admitted = sidecar
                        .admit((parts, raw), guard, Endpoint::Completions)
                        .await?;
                    sidecar.dispatch(admitted, deadline).await
                }
                .instrument(span),
            ));
        }
        let timeout = self.config.request_timeout().as_secs_f64();
        // an early return aborts the prompts still running (their jobs are cancelled)
        let mut running = Running(running.into());
        let mut answers = Vec::with_capacity(running.0.len());
        while let Some(task) = running.0.front_mut() {
            let answer = tokio::time::timeout_at(deadline.into(), task)
                .await
                .map_err(|_| ProxyError::Timeout(timeout))?
                .map_err(|e| ProxyError::Model(format!("a prompt's task failed: {e}")))??;
            running.0.pop_front();
            if answer.status() != StatusCode::OK {
                // dropping the other answers cancels their generation
                return Ok(answer);
            }
            answers.push(answer);
        }
        let lead = lead(&answers);
        let mut headers = answers[lead].headers().clone();
        headers.remove(header::CONTENT_LENGTH);
        // the request's span says what its headers say; each prompt's span has its own
        let span = tracing::Span::current();
        span.record("gen_ai.operation.name", Endpoint::Completions.as_str());
        for (field, name) in [
            ("inferaligner.decision", "x-inferaligner-gate"),
            ("inferaligner.action", "x-inferaligner-action"),
            ("inferaligner.policy", "x-inferaligner-policy"),
        ] {
            if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                span.record(field, v);
            }
        }
        let streamed = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("text/event-stream"));
        let mut response = match streamed {
            true => merged_stream(answers, choices),
            false => merged_whole(answers, choices).await?,
        };
        for (name, value) in &headers {
            response.headers_mut().insert(name, value.clone());
        }
        Ok(response)
    }
}

/// The prompts' tasks not yet awaited: aborted when the batch ends without them.
struct Running(
    std::collections::VecDeque<tokio::task::JoinHandle<Result<Response<Body>, ProxyError>>>,
);

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The span of one prompt of a batch: the fields the request flow records (its own decision,
/// policy and usage), so that prompts do not overwrite each other's in the request's span.
fn prompt_span(p: usize) -> tracing::Span {
    flow_span!("prompt", inferaligner.prompt_index = p,)
}

/// The answer whose decision headers the merged answer carries: the one the gate scored
/// highest (the first when none was scored).
fn lead(answers: &[Response<Body>]) -> usize {
    let score = |r: &Response<Body>| {
        r.headers()
            .get("x-inferaligner-score")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NEG_INFINITY)
    };
    (0..answers.len())
        .max_by(|&a, &b| {
            score(&answers[a])
                .total_cmp(&score(&answers[b]))
                .then(b.cmp(&a))
        })
        .unwrap_or(0)
}

/// Whole answers merged: the first's envelope, every answer's choices re-indexed by its
/// prompt (`choices` a prompt) and in that order, `usage` summed.
async fn merged_whole(
    answers: Vec<Response<Body>>,
    choices: usize,
) -> Result<Response<Body>, ProxyError> {
    let mut merged = Value::Null;
    let mut all = Vec::new();
    let mut usage = [0u64; 3];
    for (p, answer) in answers.into_iter().enumerate() {
        let bytes = answer
            .into_body()
            .collect()
            .await
            .map_err(|e| ProxyError::Model(format!("reading a prompt's answer: {e}")))?
            .to_bytes();
        let mut v: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ProxyError::Model(format!("a prompt's answer is not JSON: {e}")))?;
        add_usage(&mut usage, &v["usage"]);
        if let Some(cs) = v["choices"].as_array_mut() {
            for mut c in cs.drain(..) {
                let i = c["index"].as_u64().unwrap_or(0) as usize;
                c["index"] = json!(p * choices + i);
                all.push(c);
            }
        }
        if merged.is_null() {
            merged = v;
        }
    }
    all.sort_by_key(|c| c["index"].as_u64());
    merged["choices"] = Value::Array(all);
    if merged.get("usage").is_some_and(Value::is_object) {
        merged["usage"] = usage_json(usage);
    }
    Ok(json_response(StatusCode::OK, &merged))
}

/// Streamed answers merged as their chunks arrive: each chunk's choices re-indexed by its
/// prompt (`choices` a prompt), the usage chunks held back and summed into one before the one
/// `[DONE]`.
fn merged_stream(answers: Vec<Response<Body>>, choices: usize) -> Response<Body> {
    let count = answers.len();
    let (frames_tx, mut frames) = mpsc::channel::<(usize, Option<Bytes>)>(32);
    for (p, answer) in answers.into_iter().enumerate() {
        let tx = frames_tx.clone();
        tokio::spawn(async move {
            let mut body = answer.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data()
                    && tx.send((p, Some(data))).await.is_err()
                {
                    return; // the client left: dropping the body cancels the prompt
                }
            }
            let _ = tx.send((p, None)).await;
        });
    }
    drop(frames_tx);
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut pending = vec![Vec::<u8>::new(); count];
        let (mut ended, mut usage, mut usage_chunk) = (0, [0u64; 3], None::<Value>);
        while let Some((p, data)) = frames.recv().await {
            let Some(data) = data else {
                ended += 1;
                if ended < count {
                    continue;
                }
                let mut out = Vec::new();
                if let Some(mut chunk) = usage_chunk.take() {
                    chunk["usage"] = usage_json(usage);
                    out.extend_from_slice(&openai::sse(&chunk));
                }
                out.extend_from_slice(openai::SSE_DONE);
                let _ = tx.send(Bytes::from(out)).await;
                return;
            };
            pending[p].extend_from_slice(&data);
            let mut out = Vec::new();
            while let Some(end) = pending[p].windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending[p].drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let Some(payload) = text.trim_end().strip_prefix("data: ") else {
                    out.extend_from_slice(&event); // a comment or another field: as it came
                    continue;
                };
                if payload == "[DONE]" {
                    continue;
                }
                let Ok(mut chunk) = serde_json::from_str::<Value>(payload) else {
                    out.extend_from_slice(&event);
                    continue;
                };
                let no_choices = chunk["choices"].as_array().is_none_or(Vec::is_empty);
                if no_choices && chunk["usage"].is_object() {
                    add_usage(&mut usage, &chunk["usage"]);
                    usage_chunk.get_or_insert(chunk);
                    continue;
                }
                if let Some(cs) = chunk["choices"].as_array_mut() {
                    for c in cs {
                        let i = c["index"].as_u64().unwrap_or(0) as usize;
                        c["index"] = json!(p * choices + i);
                    }
                }
                out.extend_from_slice(&openai::sse(&chunk));
            }
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return; // the client left: dropping `frames` stops the readers
            }
        }
    });
    sse_response(Body::new(PassBody { rx, _guard: None }))
}

fn add_usage(sum: &mut [u64; 3], usage: &Value) {
    for (k, name) in ["prompt_tokens", "completion_tokens", "total_tokens"]
        .iter()
        .enumerate()
    {
        sum[k] += usage[name].as_u64().unwrap_or(0);
    }
}

fn usage_json([prompt, completion, total]: [u64; 3]) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total})
}
