//! The three answers after the gate: forward to the upstream, refuse, or generate here.

use super::*;

impl Sidecar {
    pub(super) async fn forward(
        self: &Arc<Self>,
        a: Admitted,
        decided: DecisionHeaders,
    ) -> Result<Response<Body>, ProxyError> {
        if decided.gate == GateLabel::off {
            self.metrics.request(decided.gate, decided.action);
        }
        let body = forwarded_body(&a.raw, &a.api, a.max_new_tokens)?;
        let mut response = self.call_upstream(&a.parts, body, a.guard).await?;
        decided.apply(response.headers_mut());
        Ok(response)
    }

    /// `body` to the upstream on the request's method, path and headers, in a client span.
    async fn call_upstream(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        guard: RequestGuard,
    ) -> Result<Response<Body>, ProxyError> {
        let upstream = self
            .upstream
            .as_ref()
            .ok_or_else(|| ProxyError::Config("no upstream in local mode".into()))?;
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            server.address = upstream.authority(),
            http.response.status_code = Empty,
        );
        let response = upstream
            .forward(parts, body, guard, &self.metrics)
            .instrument(span.clone())
            .await?;
        span.record("http.response.status_code", response.status().as_u16());
        Ok(response)
    }

    /// A request to a route of `upstream.passthrough`: to the upstream as sent, ungated (the
    /// route writes no text), within the body limit and the admission bound like any other.
    pub(super) async fn pass_through(
        self: &Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ProxyError> {
        let guard = self.admit_guard()?;
        let timeout = self.config.request_timeout();
        let (parts, raw) = tokio::time::timeout(timeout, self.read_body(req))
            .await
            .map_err(|_| ProxyError::Timeout(timeout.as_secs_f64()))??;
        tracing::Span::current().record("inferaligner.action", "passthrough");
        self.metrics
            .request(GateLabel::off, ActionLabel::passthrough);
        let mut response = self.call_upstream(&parts, raw, guard).await?;
        response.headers_mut().insert(
            "x-inferaligner-action",
            HeaderValue::from_static("passthrough"),
        );
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
        // every choice (`n`) is the refusal
        let n = a.api.n;
        let completion = tokens(&text) * n;
        let text = format!("{}{text}", a.echo.as_deref().unwrap_or_default());
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
            let last = a.meta.chunk("", false, Some(reason));
            let mut body = Vec::new();
            for chunk in [first, last] {
                for i in 0..n {
                    body.extend_from_slice(&openai::sse(&openai::with_index(chunk.clone(), i)));
                }
            }
            body.extend(a.meta.stream_tail(usage, a.api.include_usage));
            sse_response(full(body))
        } else {
            let one = match json {
                true => a.meta.refusal(&text, reason, usage),
                false => a.meta.response(&text, reason, usage),
            };
            let mut body = one.clone();
            for i in 1..n {
                push_choice(&mut body, openai::with_index(one.clone(), i));
            }
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
        (first, later): (UnboundedReceiver<BackendEvent>, Vec<LaterChoice>),
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
        // each choice's end: its steered answer counted, the request's tokens so far recorded
        let finish =
            move |text: &str, reason: &str, completion: usize, steered: Option<SteeredAnswer>| {
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
                    s.record("gen_ai.response.finish_reasons", reason);
                }
                if record_content {
                    request_span.record("gen_ai.completion", text);
                }
            };
        let n = 1 + later.len();
        let mut events = self.merged(first, later);
        let prompt_tokens = a.tokens.len();
        // an answer that may call a tool is held while it may open a call
        let tools = a.api.tools.clone();
        let mut state: Vec<Choice> = (0..n)
            .map(|_| Choice {
                held: tools.may_call().then(String::new),
                echo: a.echo.clone(),
                ..Choice::default()
            })
            .collect();
        let mut completion = 0;
        if !a.api.stream {
            let mut ends = vec![None; n];
            while let Some((i, event)) = events.recv().await {
                match event {
                    BackendEvent::Text(t) => state[i].text.push_str(&t),
                    BackendEvent::Logprobs(l) => {
                        let c = &mut state[i];
                        c.answer_logprob.0 += f64::from(l.chosen.logprob);
                        c.answer_logprob.1 += 1;
                        c.logprobs.push(l);
                    }
                    BackendEvent::PromptLogprobs(l) => state[i].logprobs.extend(l),
                    BackendEvent::Finished {
                        reason,
                        completion_tokens,
                        steered,
                        ..
                    } => {
                        completion += completion_tokens;
                        let c = &mut state[i];
                        c.calls = tools.parse(&c.text, reason == FinishReason::Length);
                        finish(
                            &c.text,
                            c.finish_reason(&a.meta, reason),
                            completion,
                            steered,
                        );
                        ends[i] = Some(reason);
                        if ends.iter().any(Option::is_none) {
                            continue;
                        }
                        let usage = (prompt_tokens, completion);
                        let mut body = Value::Null;
                        for (i, best) in best(&state, a.api.n).into_iter().enumerate() {
                            let (c, end) = (&mut state[best], ends[best].expect("ended"));
                            let one = match &c.calls {
                                Some(calls) => {
                                    a.meta.calls(calls, c.finish_reason(&a.meta, end), usage)
                                }
                                // the markup of a call cut short is not an answer
                                None if end == FinishReason::Length
                                    && tools.cut_in_first_call(&c.text) =>
                                {
                                    a.meta.nothing(end, usage)
                                }
                                None => {
                                    let echo = c.echo.take().unwrap_or_default();
                                    a.meta.response(&(echo + &c.text), end, usage)
                                }
                            };
                            let one = c.with_logprobs(&a.meta, a.api.logprobs, one);
                            match i {
                                0 => body = one,
                                _ => push_choice(&mut body, openai::with_index(one, i)),
                            }
                        }
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
        // Streaming: the head goes out now; a task turns events into SSE chunks, each with its
        // choice's index. If the client leaves, the channel closes, the task drops the
        // receivers, and the engine cancels.
        let (tx, body_rx) = mpsc::channel::<Bytes>(32);
        let meta = a.meta.clone();
        let include_usage = a.api.include_usage;
        let logprobs = a.api.logprobs;
        let timeout = self.config.request_timeout().as_secs_f64();
        tokio::spawn(
            async move {
                let send = |v: Bytes| tx.send(v);
                let mut ended = 0;
                loop {
                    let (i, event) =
                        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
                            Ok(Some(e)) => e,
                            Ok(None) => (0, dropped()),
                            Err(_) => (
                                0,
                                BackendEvent::Failed(BackendError::new(
                                    BackendErrorKind::Model,
                                    format!("request timed out after {timeout:.1} s"),
                                )),
                            ),
                        };
                    let c = &mut state[i];
                    match event {
                        BackendEvent::Text(t) => {
                            if record_content {
                                c.text.push_str(&t);
                            }
                            let t = match c.held.as_mut() {
                                Some(held) => {
                                    held.push_str(&t);
                                    if !tools.may_open_call(held) {
                                        c.held.take().unwrap_or_default()
                                    } else {
                                        // held; each call goes out as it closes
                                        if let Some(calls) = tools.closed_calls(held)
                                            && calls.len() > c.sent_calls
                                        {
                                            let from = c.sent_calls;
                                            let chunk =
                                                c.calls_chunk(&meta, logprobs, &calls, from);
                                            c.sent_calls = calls.len();
                                            let chunk = openai::with_index(chunk, i);
                                            if send(openai::sse(&chunk)).await.is_err() {
                                                return;
                                            }
                                        }
                                        continue;
                                    }
                                }
                                None => t,
                            };
                            let body = c.chunk(&meta, logprobs, i, &t);
                            if send(openai::sse(&body)).await.is_err() {
                                return; // client gone; dropping the receivers cancels
                            }
                        }
                        BackendEvent::Finished {
                            reason,
                            completion_tokens,
                            steered,
                            ..
                        } => {
                            completion += completion_tokens;
                            let held = c.held.take();
                            let cut = reason == FinishReason::Length;
                            // (calls the stream sent stay its calls whatever follows them)
                            let sent = c.sent_calls > 0;
                            c.calls = held.as_deref().and_then(|h| {
                                tools
                                    .parse(h, cut)
                                    .or_else(|| sent.then(|| tools.closed_calls(h)).flatten())
                            });
                            finish(&c.text, c.finish_reason(&meta, reason), completion, steered);
                            let mut out = Vec::new();
                            if let Some(calls) = c.calls.take() {
                                // the calls not sent yet (one cut in its closing tag, or
                                // none), then the end, with the log-probabilities of the
                                // tokens after the last call sent (its end of answer)
                                let from = c.sent_calls.min(calls.len());
                                let mut chunks = Vec::new();
                                if from < calls.len() {
                                    chunks.push(c.calls_chunk(&meta, logprobs, &calls, from));
                                }
                                c.calls = Some(calls);
                                let end = meta.calls_end(c.finish_reason(&meta, reason));
                                chunks.push(match c.logprobs.is_empty() {
                                    true => end,
                                    false => c.with_logprobs(&meta, logprobs, end),
                                });
                                for chunk in chunks {
                                    let chunk = openai::with_index(chunk, i);
                                    out.extend_from_slice(&openai::sse(&chunk));
                                }
                            } else {
                                // a held answer that is no call after all is text, unless it was
                                // cut short in its first call: that markup is not an answer
                                let nothing = cut
                                    && held.as_deref().is_some_and(|h| tools.cut_in_first_call(h));
                                let text = held.filter(|_| !nothing).unwrap_or_default();
                                if !c.started || !c.logprobs.is_empty() || !text.is_empty() {
                                    let mut body = c.chunk(&meta, logprobs, i, &text);
                                    if nothing {
                                        body["choices"][0]["delta"]["content"] = Value::Null;
                                    }
                                    out.extend_from_slice(&openai::sse(&body));
                                }
                                let last = meta.chunk("", false, Some(reason));
                                out.extend_from_slice(&openai::sse(&openai::with_index(last, i)));
                            }
                            ended += 1;
                            if ended == n {
                                let usage = (prompt_tokens, completion);
                                out.extend(meta.stream_tail(usage, include_usage));
                            }
                            if send(Bytes::from(out)).await.is_err() || ended == n {
                                return;
                            }
                        }
                        BackendEvent::Failed(e) => {
                            let e = backend_error(e);
                            tracing::warn!(error = %e, "generation failed mid-stream");
                            let mut out = openai::sse(&e.body()).to_vec();
                            out.extend_from_slice(openai::SSE_DONE);
                            let _ = send(Bytes::from(out)).await;
                            return;
                        }
                        BackendEvent::Logprobs(l) => c.logprobs.push(l),
                        BackendEvent::PromptLogprobs(l) => c.logprobs.extend(l),
                        BackendEvent::Gate(_) => {}
                    }
                }
            }
            .in_current_span(),
        );
        let mut response = sse_response(Body::new(PassBody {
            rx: body_rx,
            _guard: Some(a.guard),
        }));
        decided.apply(response.headers_mut());
        Ok(response)
    }
}

/// One choice of an answer being written: its text (whole answers, or what traces record), the
/// log-probabilities not yet sent, and where the next ones start in its text.
#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<TokenLogprob>,
    offset: usize,
    /// Its first chunk (with the assistant role) has gone out.
    started: bool,
    /// A streamed answer that may still open a tool call: its text so far, not yet sent.
    held: Option<String>,
    /// The tool calls the whole answer makes.
    calls: Option<Vec<ToolCall>>,
    /// How many of its calls a stream has sent.
    sent_calls: usize,
    /// The prompt, to write before the answer (`echo`), until it is written.
    echo: Option<String>,
    /// The sum and count of its generated tokens' log-probabilities (to rank `best_of`).
    answer_logprob: (f64, usize),
}

/// The `n` best of `candidates` (`best_of`), best first: the highest mean log-probability of
/// their generated tokens (an empty answer ranks last); all of them, in order, when they are
/// `n`.
fn best(candidates: &[Choice], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    if candidates.len() > n {
        let mean = |c: &Choice| match c.answer_logprob {
            (_, 0) => f64::NEG_INFINITY,
            (sum, count) => sum / count as f64,
        };
        order.sort_by(|&a, &b| mean(&candidates[b]).total_cmp(&mean(&candidates[a])));
        order.truncate(n);
    }
    order
}

impl Choice {
    /// The API's `finish_reason` for an answer that ended for `reason`: `tool_calls` (or
    /// `function_call`) when it calls and was not cut.
    fn finish_reason(&self, meta: &ResponseMeta, reason: FinishReason) -> &'static str {
        match (&self.calls, reason) {
            (Some(_), r) if r != FinishReason::Length => meta.calls_finish_reason(),
            _ => openai::finish_reason(reason),
        }
    }

    /// `body` (this choice's) with the log-probabilities not yet sent, when they are asked for.
    fn with_logprobs(&mut self, meta: &ResponseMeta, asked: Option<usize>, body: Value) -> Value {
        match asked {
            Some(_) => {
                let entries = std::mem::take(&mut self.logprobs);
                openai::with_logprobs(body, meta.logprobs(&entries, &mut self.offset))
            }
            None => body,
        }
    }

    /// A streamed chunk of the answer's `calls` from number `from` on, with the
    /// log-probabilities of the tokens so far.
    fn calls_chunk(
        &mut self,
        meta: &ResponseMeta,
        asked: Option<usize>,
        calls: &[ToolCall],
        from: usize,
    ) -> Value {
        let body = meta.calls_chunk(&calls[from..], from, !self.started);
        self.started = true;
        self.with_logprobs(meta, asked, body)
    }

    /// The next streamed chunk of choice `index`: `text`, with its log-probabilities.
    fn chunk(
        &mut self,
        meta: &ResponseMeta,
        asked: Option<usize>,
        index: usize,
        text: &str,
    ) -> Value {
        let text = self.echo.take().unwrap_or_default() + text;
        let body = meta.chunk(&text, !self.started, None);
        self.started = true;
        openai::with_index(self.with_logprobs(meta, asked, body), index)
    }
}

impl Sidecar {
    /// The events of every choice in one stream, each with its choice's index. The later
    /// choices' jobs are submitted when the first choice's first answer event arrives: its
    /// prompt is then in the prefix cache, and they read it from there instead of each
    /// prefilling it again alongside. A choice whose events stop without an end (the engine
    /// dropped it, or its job could not be queued) ends with a failure.
    fn merged(
        self: &Arc<Self>,
        first: UnboundedReceiver<BackendEvent>,
        later: Vec<LaterChoice>,
    ) -> UnboundedReceiver<(usize, BackendEvent)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut jobs = Vec::with_capacity(later.len());
        for (i, (job, events)) in later.into_iter().enumerate() {
            jobs.push(job);
            forward_choice(i + 1, events, tx.clone(), None);
        }
        let sidecar = self.clone();
        let start_later = move || {
            for job in jobs {
                let events = job.events.clone();
                if let Err(e) = sidecar.submit(job) {
                    let _ = events.send(BackendEvent::Failed(e));
                }
            }
        };
        forward_choice(0, first, tx, Some(Box::new(start_later)));
        rx
    }

    /// Hand `job` to the backend; a full queue is counted.
    pub(super) fn submit(&self, job: Job) -> Result<(), BackendError> {
        self.backend.submit(job).inspect_err(|e| {
            if e.kind == BackendErrorKind::Overloaded {
                self.metrics.overloaded.inc();
            }
        })
    }
}

/// Pass choice `i`'s events on to `tx`, with `i`, calling `on_answer` at the first event of
/// its answer (not the gate's decision, not a failure); a stream that stops without an end
/// ends with a failure.
fn forward_choice(
    i: usize,
    mut events: UnboundedReceiver<BackendEvent>,
    tx: mpsc::UnboundedSender<(usize, BackendEvent)>,
    mut on_answer: Option<Box<dyn FnOnce() + Send>>,
) {
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let last = matches!(
                event,
                BackendEvent::Finished { .. } | BackendEvent::Failed(_)
            );
            let answering = !matches!(event, BackendEvent::Gate(_) | BackendEvent::Failed(_));
            if let Some(start) = on_answer.take_if(|_| answering) {
                start();
            }
            if tx.send((i, event)).is_err() || last {
                return;
            }
        }
        let _ = tx.send((i, dropped()));
    });
}

fn dropped() -> BackendEvent {
    BackendEvent::Failed(BackendError::new(
        BackendErrorKind::Unavailable,
        "the engine dropped the request",
    ))
}

/// Add a whole response's one choice to `body`'s choices.
fn push_choice(body: &mut Value, one: Value) {
    if let (Some(all), Some(choice)) = (
        body["choices"].as_array_mut(),
        one["choices"].get(0).cloned(),
    ) {
        all.push(choice);
    }
}

/// The body to forward: the client's bytes, unless the sidecar must change them. A
/// `model@policy` selection becomes the model alone (the upstream knows only the model), and
/// the token limit says what the sidecar allows, the same as in local mode: `max_tokens` (and
/// `max_completion_tokens`, when sent) set to the request's limit after the sidecar's caps and
/// its default, so an upstream that knows only one of the two names honours it too
/// (`max_output_tokens` on `/v1/responses`). The body is parsed again only when it must change.
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
    if api.endpoint == Endpoint::Responses {
        // the Responses API has one name for it (read as `max_tokens`, `sent_limits.0`)
        v["max_output_tokens"] = limit;
        return Ok(Bytes::from(v.to_string()));
    }
    v["max_tokens"] = limit.clone();
    if v.get("max_completion_tokens").is_some() {
        v["max_completion_tokens"] = limit;
    }
    Ok(Bytes::from(v.to_string()))
}
