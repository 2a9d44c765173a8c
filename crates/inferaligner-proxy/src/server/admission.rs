//! Admission: the permit, the body, parsing, the policy, tokenizing and the token limits.

use super::*;

impl Sidecar {
    pub(super) fn admit_guard(&self) -> Result<RequestGuard, ProxyError> {
        let permit = self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.overloaded.inc();
            ProxyError::Overloaded
        })?;
        Ok(RequestGuard::new(permit, self.metrics.clone()))
    }

    /// The request's head and body, within `server.max_body_bytes`.
    pub(super) async fn read_body(
        &self,
        req: Request<Incoming>,
    ) -> Result<(http::request::Parts, Bytes), ProxyError> {
        let limit = self.config.server.max_body_bytes;
        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        let raw = match Limited::new(body, limit).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            Err(e) => {
                return Err(ProxyError::invalid(
                    format!("could not read the request body: {e}"),
                    None,
                ));
            }
        };
        Ok((parts, raw))
    }

    /// A read request (`parts`, `raw`, holding `guard`) parsed, checked, under its policy,
    /// tokenized and limited.
    pub(super) async fn admit(
        self: &Arc<Self>,
        (parts, raw): (http::request::Parts, Bytes),
        guard: RequestGuard,
        endpoint: Endpoint,
    ) -> Result<Admitted, ProxyError> {
        let span = tracing::Span::current();
        let api = openai::parse_request(endpoint, &raw)?;
        let vocab = self.backend.info().vocab_size;
        if let Some(id) = api
            .sampling
            .logit_bias
            .keys()
            .find(|&&id| id as usize >= vocab)
        {
            return Err(ProxyError::invalid(
                format!("`logit_bias`: token id {id} is outside the vocabulary (0..{vocab})"),
                Some("logit_bias"),
            ));
        }
        if self.config.server.mode == ServeMode::Local {
            // every answer is written here: refuse what the generator cannot honour up front
            api.refuse_unsupported()?;
        }
        span.record("gen_ai.operation.name", endpoint.as_str());
        span.record("stream", api.stream);
        span.record(
            "gen_ai.request.temperature",
            f64::from(api.sampling.temperature),
        );
        if let Some(m) = &api.model {
            span.record(
                "gen_ai.request.model",
                m.chars().take(128).collect::<String>(),
            );
        }
        if let Some(user) = &api.end_user {
            span.record("user.id", user.chars().take(128).collect::<String>());
        }
        if self.config.trace.record_content {
            let prompt = match &api.prompt {
                Prompt::Chat(m) => serde_json::to_string(m).unwrap_or_default(),
                Prompt::Text(t) => t.clone(),
                Prompt::Tokens(ids) => serde_json::to_string(ids).unwrap_or_default(),
            };
            span.record("gen_ai.prompt", prompt);
        }
        // `model` names this sidecar's model (with a policy after `@`), or is left out: another
        // name would be answered by a model the client did not ask for
        let (model, model_policy) = api.model_and_policy();
        if let Some(name) = model.filter(|m| *m != self.model_id) {
            return Err(ProxyError::ModelNotFound(name.chars().take(128).collect()));
        }
        let (policy_name, policy) = self.select_policy(&parts.headers, model_policy)?;
        // a flagged request the sidecar cannot steer (JSON, tools, log-probabilities of an
        // answer the policy holds) is refused rather than steered
        let holds = policy.steered_answers != SteeredAnswers::AsGenerated;
        let policy = match api.steerable(holds) {
            true => policy,
            false => policy.without_steering(),
        };
        span.record("inferaligner.policy", policy_name.as_str());
        if endpoint == Endpoint::Completions && policy.raw_completions == RawCompletions::Refuse {
            return Err(ProxyError::Forbidden(format!(
                "policy `{policy_name}` does not allow raw-text completions; use /v1/chat/completions"
            )));
        }

        let backend = self.backend.clone();
        let prompt = api.prompt.clone();
        let Tokenized {
            tokens,
            gate_views,
            context_views,
        } = tokio::task::spawn_blocking(move || backend.tokenize(&prompt))
            .await
            .map_err(|e| ProxyError::Model(format!("tokenizer task failed: {e}")))?
            .map_err(backend_error)?;
        let gate_views = policy.gate_views(gate_views, context_views);
        let context = self.backend.info().context_length;
        let max_prompt = self
            .config
            .server
            .max_prompt_tokens
            .min(context.saturating_sub(1));
        if tokens.len() > max_prompt {
            return Err(ProxyError::InvalidRequest {
                message: format!(
                    "the prompt is {} tokens; at most {max_prompt} are accepted (model context {context})",
                    tokens.len()
                ),
                param: Some(
                    match endpoint {
                        Endpoint::Chat => "messages",
                        Endpoint::Completions => "prompt",
                        Endpoint::Responses => "input",
                    }
                    .into(),
                ),
                code: Some("context_length_exceeded"),
            });
        }
        let max_new_tokens = api
            .max_tokens
            .unwrap_or(self.config.server.default_max_tokens)
            .min(self.config.server.max_new_tokens)
            .min(context - tokens.len());
        span.record("gen_ai.request.max_tokens", int(max_new_tokens));
        span.record("gen_ai.usage.input_tokens", int(tokens.len()));
        let meta = ResponseMeta {
            functions: api.functions,
            ..ResponseMeta::new(endpoint, self.model_id.clone())
        };
        // the prompt as sent, or as its token ids read
        let echo = match (&api.prompt, api.echo) {
            (_, false) | (Prompt::Chat(_), true) => None,
            (Prompt::Text(t), true) => Some(t.clone()),
            (Prompt::Tokens(ids), true) => {
                Some(self.backend.detokenize(ids).map_err(backend_error)?)
            }
        };
        Ok(Admitted {
            parts,
            raw,
            api,
            tokens,
            gate_views,
            max_new_tokens,
            policy_name,
            policy,
            guard,
            meta,
            echo,
        })
    }
}
