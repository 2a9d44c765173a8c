//! Structured outputs: an answer held to a JSON grammar or schema (`response_format`) token by
//! token. llguidance computes, before each token, which tokens of the vocabulary keep the text a
//! prefix of something the schema accepts; the others are masked out of the logits before
//! sampling, and the end-of-sequence token is allowed only once the JSON is complete.

use std::sync::Arc;

use inferaligner_core::{JsonSchemaFormat, ResponseFormat};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::{ChatTokenizer, Result, RuntimeError};

/// Builds a [`Constraint`] per request for one tokenizer (the vocabulary's bytes in a trie,
/// built once, when the engine starts: ~0.4 s for SmolLM2's 49k tokens on 2 cores).
pub struct Structured {
    factory: ParserFactory,
    /// Grammars compiled for recent schemas, most recently used last, keyed by the schema's
    /// canonical text: an application sends the same schema with every request, and compiling
    /// one can take tens of milliseconds of the engine thread.
    compiled: Vec<(String, Constraint)>,
}

/// Schemas and grammars whose compiled forms are kept.
const COMPILED_SCHEMAS: usize = 64;

impl std::fmt::Debug for Structured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Structured").finish_non_exhaustive()
    }
}

/// llguidance's view of the vocabulary: each token's bytes, and our tokenizer for text it
/// must tokenize itself (forced text in a grammar).
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // bytes that are not UTF-8 are cut mid-character: the trie tokenizes them greedily
        match std::str::from_utf8(s).map(|text| self.tokenizer.encode_fast(text, false)) {
            Ok(Ok(encoding)) => encoding.get_ids().to_vec(),
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

impl Structured {
    /// For `tokenizer` (byte-level BPE or byte fallback), whose model scores `vocab_size`
    /// logits, ending an answer with `eos`.
    pub fn new(tokenizer: &ChatTokenizer, vocab_size: usize, eos: TokenId) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| {
            RuntimeError::Tokenizer(format!("structured outputs cannot use this tokenizer: {e}"))
        };
        let mut words = tokenizer.vocabulary_bytes().map_err(|e| fail(&e))?.to_vec();
        // logits past the tokenizer's vocabulary (padding rows) are tokens of no bytes: never
        // allowed
        words.resize(words.len().max(vocab_size), Vec::new());
        let info = TokRxInfo::new(words.len() as u32, eos);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&info, &words),
            tokenizer: tokenizer.tokenizer().clone(),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| fail(&e))?;
        factory.quiet();
        Ok(Self {
            factory,
            compiled: Vec::new(),
        })
    }

    /// The constraint for `format`; `None` for free text. An invalid schema is an input error.
    pub fn constraint(&mut self, format: &ResponseFormat) -> Result<Option<Constraint>> {
        let mut schema = match format {
            ResponseFormat::Text => return Ok(None),
            ResponseFormat::Grammar { lark } => {
                return self
                    .compiled(lark.clone(), Held::Tools, || {
                        TopLevelGrammar::from_lark(lark.clone())
                    })
                    .map(Some)
                    .map_err(|e| match e {
                        RuntimeError::InputField { field, message } => RuntimeError::InputField {
                            field,
                            message: inferaligner_core::in_parameters_terms(&message),
                        },
                        e => e,
                    });
            }
            ResponseFormat::JsonSchema {
                json_schema:
                    JsonSchemaFormat {
                        schema: Some(schema),
                        ..
                    },
            } => schema.clone(),
            // JSON mode, or a schema without one: any object
            _ => json!({"type": "object"}),
        };
        if !schema.is_object() {
            return Err(Held::Schema
                .error("`response_format.json_schema.schema` must be a JSON object".into()));
        }
        if schema.get("x-guidance").is_none() {
            // One space after `,` and `:` and no other whitespace: a small model given the
            // choice pads JSON with newlines until it runs out of tokens.
            JsonCompileOptions {
                item_separator: ", ".into(),
                key_separator: ": ".into(),
                whitespace_flexible: false,
                ..JsonCompileOptions::default()
            }
            .apply_to(&mut schema);
        }
        let key = inferaligner_core::canonical_json(&schema);
        self.compiled(key, Held::Schema, || {
            TopLevelGrammar::from_json_schema(schema)
        })
        .map(Some)
    }

    /// A fresh constraint of the grammar `key` names (`held` says what it comes from, for
    /// errors), compiled once and kept while recently used.
    fn compiled(
        &mut self,
        key: String,
        held: Held,
        grammar: impl FnOnce() -> TopLevelGrammar,
    ) -> Result<Constraint> {
        if let Some(i) = self.compiled.iter().position(|(k, _)| *k == key) {
            let entry = self.compiled.remove(i);
            let fresh = entry.1.fresh();
            self.compiled.push(entry);
            return Ok(fresh);
        }
        let what = held.what();
        let matcher = Matcher::new(self.factory.create_parser(grammar()));
        if let Some(e) = matcher.get_error() {
            return Err(held.error(format!(
                "{what} cannot be used: {}",
                // the reason, without llguidance's position and the grammar it quotes (the
                // request's schemas: errors are logged)
                e.lines()
                    .next()
                    .map(|l| {
                        let at = l.strip_prefix("at ").and_then(|r| r.split_once("): "));
                        at.map_or(l, |(_, why)| why)
                    })
                    .unwrap_or_default()
            )));
        }
        // A grammar can compile and still admit no text at all (a schema that only refers to
        // itself, `{"$ref": "#"}`): llguidance finds out at the first token, when a streamed
        // answer has begun. Ask it now, on a copy, so that such a request is refused up front.
        // (A dead end deeper in, e.g. in a tool's arguments after its name, shows only there:
        // see `Constraint::mask`.)
        if !matches!(matcher.clone().compute_mask_or_eos(), Ok(m) if !m.is_zero()) {
            return Err(held.error(format!("{what} cannot be used: it admits no value")));
        }
        if self.compiled.len() == COMPILED_SCHEMAS {
            self.compiled.remove(0);
        }
        let constraint = Constraint { matcher, held };
        self.compiled.push((key, constraint.fresh()));
        Ok(constraint)
    }
}

/// Where a grammar comes from: the request's `response_format`, or its `tools`.
#[derive(Debug, Clone, Copy)]
enum Held {
    Schema,
    Tools,
}

impl Held {
    /// The request field the grammar comes from.
    fn field(self) -> &'static str {
        match self {
            Held::Schema => "response_format",
            Held::Tools => "tools",
        }
    }

    /// The grammar, as an error message begins with it.
    fn what(self) -> &'static str {
        match self {
            Held::Schema => "`response_format`: the JSON schema",
            Held::Tools => "`tools`: a function's `parameters` schema",
        }
    }

    /// An input error about the field.
    fn error(self, message: String) -> RuntimeError {
        RuntimeError::InputField {
            field: self.field(),
            message,
        }
    }
}

/// One answer's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    held: Held,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// A copy at the grammar's start (the compiled grammar is kept and copied per answer).
    fn fresh(&self) -> Self {
        Self {
            matcher: self.matcher.clone(),
            held: self.held,
        }
    }

    /// Set the logits of tokens the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| self.dead_end(&e))?;
        if allowed.is_zero() {
            return Err(self.dead_end(&"no token allowed"));
        }
        for (token, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Record the sampled token; `true` once the grammar is complete and nothing may follow.
    pub fn accept(&mut self, token: TokenId) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| self.dead_end(&e))?;
        Ok(self.matcher.is_stopped())
    }

    /// The answer cannot go on within its grammar: a schema in the request admits nothing
    /// after what was generated (one that only refers to itself, deep in a tool's
    /// arguments). llguidance's error by its first line: the lines after it dump the parser's
    /// state.
    fn dead_end(&self, e: &dyn std::fmt::Display) -> RuntimeError {
        let e = e.to_string();
        tracing::debug!(error = %e, "grammar error");
        self.held.error(format!(
            "{} admits nothing after this point of the answer, so it cannot be followed ({})",
            self.held.what(),
            e.lines().next().unwrap_or_default()
        ))
    }
}
