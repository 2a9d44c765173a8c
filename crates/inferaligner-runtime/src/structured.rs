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
    compiled: Vec<(String, Matcher)>,
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
                    .compiled(
                        lark.clone(),
                        "tools: a function's `parameters` schema",
                        || TopLevelGrammar::from_lark(lark.clone()),
                    )
                    .map(Some)
                    .map_err(|e| match e {
                        RuntimeError::Input(m) => {
                            RuntimeError::Input(inferaligner_core::in_parameters_terms(&m))
                        }
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
            return Err(RuntimeError::Input(
                "response_format.json_schema.schema must be a JSON object".into(),
            ));
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
        self.compiled(key, "response_format: the JSON schema", || {
            TopLevelGrammar::from_json_schema(schema)
        })
        .map(Some)
    }

    /// A fresh constraint of the grammar `key` names (`what`, in an error), compiled once and
    /// kept while recently used.
    fn compiled(
        &mut self,
        key: String,
        what: &str,
        grammar: impl FnOnce() -> TopLevelGrammar,
    ) -> Result<Constraint> {
        if let Some(i) = self.compiled.iter().position(|(k, _)| *k == key) {
            let entry = self.compiled.remove(i);
            let fresh = entry.1.clone();
            self.compiled.push(entry);
            return Ok(Constraint(fresh));
        }
        let matcher = Matcher::new(self.factory.create_parser(grammar()));
        if let Some(e) = matcher.get_error() {
            return Err(RuntimeError::Input(format!(
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
        if !matches!(matcher.clone().compute_mask_or_eos(), Ok(m) if !m.is_zero()) {
            return Err(RuntimeError::Input(format!(
                "{what} cannot be used: it admits no value"
            )));
        }
        if self.compiled.len() == COMPILED_SCHEMAS {
            self.compiled.remove(0);
        }
        self.compiled.push((key, matcher.clone()));
        Ok(Constraint(matcher))
    }
}

/// One answer's place in its grammar.
pub struct Constraint(Matcher);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Set the logits of tokens the grammar does not allow next to −∞.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = self.0.compute_mask_or_eos().map_err(grammar_error)?;
        if allowed.is_zero() {
            return Err(RuntimeError::Input(
                "response_format: no token can continue the answer".into(),
            ));
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
        self.0.consume_token(token).map_err(grammar_error)?;
        Ok(self.0.is_stopped())
    }
}

/// llguidance's error, by its first line: the lines after it dump the parser's state.
fn grammar_error(e: impl std::fmt::Display) -> RuntimeError {
    let e = e.to_string();
    tracing::debug!(error = %e, "grammar error");
    RuntimeError::Input(format!(
        "response_format: {}",
        e.lines().next().unwrap_or_default()
    ))
}
