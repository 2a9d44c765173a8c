//! Dispatch: the gate's decision under the request's policy, and what follows it.

use super::*;

impl Sidecar {
    pub(super) async fn api(
        self: &Arc<Self>,
        req: Request<Incoming>,
        endpoint: Endpoint,
    ) -> Result<Response<Body>, ProxyError> {
        let deadline = Instant::now() + self.config.request_timeout();
        let timeout = self.config.request_timeout().as_secs_f64();
        let guard = self.admit_guard()?;
        let read = tokio::time::timeout_at(deadline.into(), self.read_body(req))
            .await
            .map_err(|_| ProxyError::Timeout(timeout))??;
        if endpoint == Endpoint::Completions
            && let Some(bodies) = openai::split_prompts(&read.1)
        {
            return self.batch((read.0, bodies), guard, deadline).await;
        }
        // a Response is written as chat and rewritten: the request, to echo its settings
        let responses = (endpoint == Endpoint::Responses).then(|| read.1.clone());
        let answered = async {
            let admitted =
                tokio::time::timeout_at(deadline.into(), self.admit(read, guard, endpoint))
                    .await
                    .map_err(|_| ProxyError::Timeout(timeout))??;
            tokio::time::timeout_at(deadline.into(), self.dispatch(admitted, deadline))
                .await
                .map_err(|_| ProxyError::Timeout(timeout))?
        };
        Ok(match responses {
            Some(request) => {
                let answer = answered.await.map_err(openai::in_responses_words)?;
                responses::as_response(answer, &request).await
            }
            None => answered.await?,
        })
    }

    pub(super) async fn dispatch(
        self: &Arc<Self>,
        a: Admitted,
        deadline: Instant,
    ) -> Result<Response<Body>, ProxyError> {
        let span = tracing::Span::current();
        let mode = self.config.server.mode;
        let gated = a.policy.mode != PolicyMode::Off && self.backend.info().has_pack;
        // `+ 0.0` turns the -0 of a zero offset into 0
        let threshold = -f64::from(a.policy.offset) + 0.0;
        let mut decided = DecisionHeaders {
            policy: a.policy_name.clone(),
            gate: GateLabel::off,
            score: None,
            threshold,
            action: ActionLabel::generate,
        };
        if mode == ServeMode::Proxy && !gated {
            decided.action = ActionLabel::forward;
            return self.forward(a, decided).await;
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let job = a.job(mode, (0, None), tx);
        let gate_span = tracing::info_span!(
            "gate",
            inferaligner.decision = Empty,
            inferaligner.score = Empty,
            inferaligner.threshold = threshold,
            inferaligner.gate_layer = Empty,
            inferaligner.policy = a.policy_name.as_str(),
            inferaligner.action = Empty,
            inferaligner.alpha = Empty,
            inferaligner.steered_layers = Empty,
            error.type = Empty,
        );
        let started = Instant::now();
        // The first event: the gate's decision, or (no gate) the first text, or a failure. A
        // gate that cannot run at all — the engine stopped, or it dropped the request — is a
        // gating failure like a model error: the policy's `on_error` decides.
        let first = match self.submit(job) {
            Err(e) if e.kind == BackendErrorKind::Overloaded => return Err(backend_error(e)),
            Err(e) if gated && e.kind == BackendErrorKind::Unavailable => {
                Some(BackendEvent::Failed(BackendError::new(
                    BackendErrorKind::Model,
                    format!("the gate could not run: {}", e.message),
                )))
            }
            Err(e) => return Err(backend_error(e)),
            Ok(()) if gated => {
                let limit = self.config.gate_timeout();
                let first = tokio::time::timeout(limit, rx.recv())
                    .instrument(gate_span.clone())
                    .await;
                self.metrics
                    .gate_latency
                    .observe(started.elapsed().as_secs_f64());
                Some(match first {
                    Ok(Some(event)) => event,
                    Ok(None) => BackendEvent::Failed(BackendError::new(
                        BackendErrorKind::Model,
                        "the engine dropped the request before its gate decision",
                    )),
                    // the job's receiver goes with `rx` when the request ends: the engine drops it
                    Err(_) => BackendEvent::Failed(BackendError::new(
                        BackendErrorKind::Model,
                        format!(
                            "the gate did not decide within server.gate_timeout_s ({:.1} s)",
                            limit.as_secs_f64()
                        ),
                    )),
                })
            }
            Ok(()) => None,
        };
        match first {
            Some(BackendEvent::Gate(report)) => {
                let GateReport {
                    decision,
                    layer,
                    alpha,
                    ref layers,
                } = report;
                decided.gate = if decision.harmful {
                    GateLabel::harmful
                } else {
                    GateLabel::harmless
                };
                decided.score = Some(decision.score);
                decided.action = match (decision.action, mode) {
                    (Action::Block, _) => ActionLabel::block,
                    (Action::Steer, _) => ActionLabel::steer,
                    (Action::Pass, ServeMode::Local) => ActionLabel::generate,
                    (Action::Pass, ServeMode::Proxy) => ActionLabel::forward,
                };
                gate_span.record("inferaligner.decision", decided.gate.as_str());
                gate_span.record("inferaligner.score", decision.score);
                gate_span.record("inferaligner.gate_layer", int(layer));
                gate_span.record("inferaligner.action", action_str(decided.action));
                if decision.action == Action::Steer {
                    gate_span.record("inferaligner.alpha", f64::from(alpha));
                    gate_span.record("inferaligner.steered_layers", format!("{layers:?}"));
                }
            }
            Some(BackendEvent::Failed(e)) if is_gate_failure(&e) => {
                gate_span.record("error.type", "gate_failed");
                tracing::warn!(parent: &gate_span, error = %e.message, on_error = ?a.policy.on_error, "gating failed");
                decided.gate = GateLabel::error;
                decided.action = match (a.policy.on_failure(), mode) {
                    (Action::Pass, ServeMode::Proxy) => ActionLabel::forward,
                    (Action::Pass, ServeMode::Local) => {
                        // fail-open cannot help when the local model itself failed
                        self.metrics.request(GateLabel::error, ActionLabel::error);
                        return Err(ProxyError::Model(e.message));
                    }
                    _ => ActionLabel::block,
                };
                gate_span.record("inferaligner.action", action_str(decided.action));
            }
            Some(BackendEvent::Failed(e)) => return Err(backend_error(e)),
            Some(other) => {
                return Err(ProxyError::Model(format!(
                    "backend sent {other:?} before its gate decision"
                )));
            }
            None => {}
        }
        drop(gate_span);
        // A steered request in proxy mode is answered here, not by the upstream: a field only
        // the upstream could honour is refused, with the decision that led here.
        let unsupported = match decided.action {
            ActionLabel::steer | ActionLabel::generate => a.api.refuse_unsupported().err(),
            _ => None,
        };
        if unsupported.is_some() {
            decided.action = ActionLabel::error;
        }
        span.record("inferaligner.decision", decided.gate.as_str());
        span.record("inferaligner.action", action_str(decided.action));
        self.metrics.request(decided.gate, decided.action);
        if let Some(e) = unsupported {
            drop(rx);
            let mut response = error_response(&e, self.config.server.retry_after_s);
            decided.apply(response.headers_mut());
            return Ok(response);
        }
        let outcome = match decided.action {
            ActionLabel::forward => {
                drop(rx);
                self.forward(a, decided.clone()).await
            }
            ActionLabel::block => {
                drop(rx);
                self.refuse(a, decided.clone())
            }
            _ => {
                let later = later_choices(&a, mode, decided.action);
                self.generate(a, decided.clone(), (rx, later), deadline)
                    .await
            }
        };
        // An error after the gate ran still says what the gate decided.
        outcome.or_else(|e| {
            span.record("error.type", e.kind());
            span.record("otel.status_code", "ERROR");
            let mut response = error_response(&e, self.config.server.retry_after_s);
            decided.action = ActionLabel::error;
            decided.apply(response.headers_mut());
            Ok(response)
        })
    }
}

/// The jobs of a request's choices after the first (`n`, or the `best_of` candidates), with
/// their receivers: each follows the first's gate decision (`action`: steer or generate).
fn later_choices(a: &Admitted, mode: ServeMode, action: ActionLabel) -> Vec<LaterChoice> {
    let decided = match action {
        ActionLabel::steer => Action::Steer,
        _ => Action::Pass,
    };
    (1..a.api.best_of)
        .map(|choice| {
            let (tx, rx) = mpsc::unbounded_channel();
            (a.job(mode, (choice, Some(decided)), tx), rx)
        })
        .collect()
}
