//! The three answers after the gate: forward to the upstream, refuse, or generate here.

use super::*;

impl Sidecar {
    pub(super) async fn forward(
        self: &Arc<Self>,
        a: Admitted,
        decided: DecisionHeaders,
    ) -> Result<Response<Body>, ProxyError> {
        let upstream = self
            .upstream
            .as_ref()
            .ok_or_else(|| ProxyError::Config("no upstream in local mode".into()))?;
        if decided.gate == GateLabel::off {
            self.metrics.request(decided.gate, decided.action);
        }
        let body = forwarded_body(&a.raw, &a.api, a.max_new_tokens)?;
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            server.address = upstream.authority(),
            http.response.status_code = Empty,
        );
        let mut response = upstream
            .forward(&a.parts, body, a.guard, &self.metrics)
            .instrument(span.clone())
            .await?;
        span.record("http.response.status_code", response.status().as_u16());
        decided.apply(response.headers_mut());
        Ok(response)
    }

    pub(super) fn refuse(
        &self,
        a: Admitted,
        decided: DecisionHeaders,
    ) -> Result<Response<Body>, ProxyError> {
        // the refusal obeys the request's stop strings and token limit as an answer would
        let tokens = |text: &str| {
            self.backend
                .tokenize(&Prompt::Text(text.to_owned()))
                .map_or(0, |t| t.tokens.len())
        };
        let limit = a.max_written_tokens();
        let (text, cut) = within_limits(&a.policy.refusal, &a.api.stop, limit, tokens);
        let reason = cut.unwrap_or(FinishReason::Stop);
        let completion = tokens(&text);
        let usage = (a.tokens.len(), completion);
        tracing::Span::current().record("gen_ai.usage.output_tokens", int(completion));
        tracing::Span::current().record(
            "gen_ai.response.finish_reasons",
            openai::finish_reason(reason),
        );
        // an answer that must be JSON refuses in the `refusal` field, as OpenAI's do
        let json = a.api.response_format.is_json();
        let mut response = if a.api.stream {
            let first = match json {
                true => a.meta.refusal_chunk(&text),
                false => a.meta.chunk(&text, true, None),
            };
            let mut body = openai::sse(&first).to_vec();
            body.extend(a.meta.stream_end(reason, usage, a.api.include_usage));
            sse_response(full(body))
        } else {
            let body = match json {
                true => a.meta.refusal(&text, reason, usage),
                false => a.meta.response(&text, reason, usage),
            };
            json_response(StatusCode::OK, &body)
        };
        decided.apply(response.headers_mut());
        drop(a.guard);
        Ok(response)
    }

    pub(super) async fn generate(
        self: &Arc<Self>,
        a: Admitted,
        decided: DecisionHeaders,
        mut rx: UnboundedReceiver<BackendEvent>,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let gen_span = tracing::info_span!(
            "generate",
            inferaligner.steered = decided.action == ActionLabel::steer,
            gen_ai.usage.input_tokens = a.tokens.len(),
            gen_ai.usage.output_tokens = Empty,
            gen_ai.response.finish_reasons = Empty,
            inferaligner.steered_answer = Empty,
            inferaligner.steered_retries = Empty,
        );
        let request_span = tracing::Span::current();
        let record_content = self.config.trace.record_content;
        let metrics = self.metrics.clone();
        let finish = move |text: &str,
                           reason: FinishReason,
                           completion: usize,
                           steered: Option<SteeredAnswer>| {
            if let Some(SteeredAnswer { ending, retries }) = steered {
                gen_span.record("inferaligner.steered_answer", ending.as_str());
                gen_span.record("inferaligner.steered_retries", int(retries));
                metrics
                    .steered_answers
                    .get_or_create(&SteeredLabels {
                        ending: ending.as_str().to_owned(),
                    })
                    .inc();
                metrics.steered_retries.inc_by(retries as u64);
            }
            for s in [&gen_span, &request_span] {
                s.record("gen_ai.usage.output_tokens", int(completion));
                s.record(
                    "gen_ai.response.finish_reasons",
                    openai::finish_reason(reason),
                );
            }
            if record_content {
                request_span.record("gen_ai.completion", text);
            }
        };
        // the log-probabilities of tokens not yet sent, when the request asks for them
        let with_logprobs = |body: Value, logprobs: &mut Vec<TokenLogprob>, offset: &mut usize| {
            match a.api.logprobs {
                Some(_) => {
                    let entries = std::mem::take(logprobs);
                    openai::with_logprobs(body, a.meta.logprobs(&entries, offset))
                }
                None => body,
            }
        };
        if !a.api.stream {
            let mut text = String::new();
            let mut logprobs = Vec::new();
            while let Some(event) = rx.recv().await {
                match event {
                    BackendEvent::Text(t) => text.push_str(&t),
                    BackendEvent::Logprobs(l) => logprobs.push(l),
                    BackendEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        steered,
                    } => {
                        finish(&text, reason, completion_tokens, steered);
                        let body =
                            a.meta
                                .response(&text, reason, (prompt_tokens, completion_tokens));
                        let body = with_logprobs(body, &mut logprobs, &mut 0);
                        let mut response = json_response(StatusCode::OK, &body);
                        decided.apply(response.headers_mut());
                        return Ok(response);
                    }
                    BackendEvent::Failed(e) => return Err(backend_error(e)),
                    BackendEvent::Gate(_) => {}
                }
            }
            return Err(ProxyError::Model("the engine dropped the request".into()));
        }
        // Streaming: the head goes out now; a task turns events into SSE chunks. If the
        // client leaves, the channel closes, the task drops `rx`, and the engine cancels.
        let (tx, body_rx) = mpsc::channel::<Bytes>(32);
        let meta = a.meta.clone();
        let include_usage = a.api.include_usage;
        let asks_logprobs = a.api.logprobs.is_some();
        let timeout = self.config.request_timeout().as_secs_f64();
        tokio::spawn(
            async move {
                let mut first = true;
                let mut text = String::new();
                // log-probabilities go out with the chunk of their token's text
                let mut logprobs = Vec::new();
                let mut offset = 0;
                let mut chunk = |body: Value, logprobs: &mut Vec<TokenLogprob>| match asks_logprobs
                {
                    true => {
                        let entries = std::mem::take(logprobs);
                        openai::with_logprobs(body, meta.logprobs(&entries, &mut offset))
                    }
                    false => body,
                };
                let send = |v: Bytes| tx.send(v);
                loop {
                    let event = match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                        Ok(Some(e)) => e,
                        Ok(None) => BackendEvent::Failed(BackendError::new(
                            BackendErrorKind::Unavailable,
                            "the engine dropped the request",
                        )),
                        Err(_) => BackendEvent::Failed(BackendError::new(
                            BackendErrorKind::Model,
                            format!("request timed out after {timeout:.1} s"),
                        )),
                    };
                    match event {
                        BackendEvent::Text(t) => {
                            if record_content {
                                text.push_str(&t);
                            }
                            let body = chunk(meta.chunk(&t, first, None), &mut logprobs);
                            if send(openai::sse(&body)).await.is_err() {
                                return; // client gone; dropping rx cancels generation
                            }
                            first = false;
                        }
                        BackendEvent::Finished {
                            reason,
                            prompt_tokens,
                            completion_tokens,
                            steered,
                        } => {
                            finish(&text, reason, completion_tokens, steered);
                            let mut out = Vec::new();
                            if first || !logprobs.is_empty() {
                                let body = chunk(meta.chunk("", first, None), &mut logprobs);
                                out.extend_from_slice(&openai::sse(&body));
                            }
                            let usage = (prompt_tokens, completion_tokens);
                            out.extend(meta.stream_end(reason, usage, include_usage));
                            let _ = send(Bytes::from(out)).await;
                            return;
                        }
                        BackendEvent::Failed(e) => {
                            let e = backend_error(e);
                            tracing::warn!(error = %e, "generation failed mid-stream");
                            let mut out = openai::sse(&e.body()).to_vec();
                            out.extend_from_slice(openai::SSE_DONE);
                            let _ = send(Bytes::from(out)).await;
                            return;
                        }
                        BackendEvent::Logprobs(l) => logprobs.push(l),
                        BackendEvent::Gate(_) => {}
                    }
                }
            }
            .in_current_span(),
        );
        let mut response = sse_response(Body::new(PassBody {
            rx: body_rx,
            _guard: a.guard,
        }));
        decided.apply(response.headers_mut());
        Ok(response)
    }
}

/// The body to forward: the client's bytes, unless the sidecar must change them. A
/// `model@policy` selection becomes the model alone (the upstream knows only the model), and
/// the token limit says what the sidecar allows, the same as in local mode: `max_tokens` (and
/// `max_completion_tokens`, when sent) set to the request's limit after the sidecar's caps and
/// its default, so an upstream that knows only one of the two names honours it too.
/// The body is parsed again only when it must change.
fn forwarded_body(
    raw: &Bytes,
    api: &ApiRequest,
    max_new_tokens: usize,
) -> Result<Bytes, ProxyError> {
    let (model, policy) = api.model_and_policy();
    let sent = u64::try_from(max_new_tokens).ok();
    let (max_tokens, max_completion_tokens) = api.sent_limits;
    if policy.is_none()
        && max_tokens == sent
        && max_completion_tokens.is_none_or(|m| Some(m) == sent)
    {
        return Ok(raw.clone());
    }
    let mut v: serde_json::Value = serde_json::from_slice(raw)
        .map_err(|e| ProxyError::invalid(format!("invalid JSON: {e}"), None))?;
    let limit = json!(max_new_tokens);
    if let (Some(model), Some(_)) = (model, policy) {
        // the suffix selects a policy here; the upstream knows the model by its name
        v["model"] = json!(model);
    }
    v["max_tokens"] = limit.clone();
    if v.get("max_completion_tokens").is_some() {
        v["max_completion_tokens"] = limit;
    }
    Ok(Bytes::from(v.to_string()))
}
