//! Chat templates (minijinja, Hugging Face semantics) and tokenization (`tokenizers`).
//!
//! Special-token strings that a user types (`<|im_start|>`, `</s>`…) are encoded as plain text,
//! never as control tokens: before rendering, every special-token string inside message content
//! is swapped for a private-use sentinel; after rendering, the text between sentinels is
//! tokenized normally (so the template's own special tokens stay control tokens) and each
//! sentinel is tokenized as text.
//!
//! A raw prompt (`/v1/completions`) is the model's whole input, written by the client: its
//! special-token strings are control tokens, as llama.cpp and vLLM read them, so a raw prompt
//! that embeds the chat template is the chat it spells.

use std::path::Path;
use std::sync::OnceLock;

use inferaligner_core::MESSAGE_ROLES;
use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::manifest::Manifest;
use crate::{Result, RuntimeError};

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`…
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

// Sentinels from Unicode plane 15 (private use): never produced by a tokenizer's vocabulary
// of real text, and left alone by the string filters templates use.
const SENTINEL_OPEN: char = '\u{F0000}';
const SENTINEL_CLOSE: char = '\u{F0001}';

/// A model's tokenizer and chat template.
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer with special-token matching off: everything is text.
    text_tokenizer: Tokenizer,
    env: Option<Environment<'static>>,
    special_strings: Vec<String>,
    bos_token: String,
    eos_token: String,
    bos_token_id: Option<u32>,
    add_bos_token: bool,
    /// What opens and closes a user turn in the chat template (`<|im_start|>user\n`,
    /// `<|im_end|>`), found once at load; `None` without a template or special tokens.
    user_turn: Option<(String, String)>,
    /// The same for a system turn.
    system_turn: Option<(String, String)>,
    /// The tokens a one-turn chat starts with before the user's content (the default system
    /// prompt and the user turn's opener), found once at load; empty without a template.
    one_turn_prefix: Vec<u32>,
    /// Each token's bytes, read from `tokenizer.json` on first use ([`Self::vocabulary_bytes`]).
    vocabulary_bytes: OnceLock<std::result::Result<Vec<Vec<u8>>, String>>,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("chat_template", &self.env.is_some())
            .finish()
    }
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Tokenizer(format!("{}: {e}", path.display()))
}

impl ChatTokenizer {
    /// Load the tokenizer and chat template an export's manifest names.
    pub fn load(manifest: &Manifest) -> Result<Self> {
        let path = manifest.dir().join(&manifest.tokenizer.file);
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| tokenizer_error(&path, e))?;
        let mut text_tokenizer = tokenizer.clone();
        text_tokenizer.set_encode_special_tokens(true);
        let special_strings = tokenizer
            .get_added_tokens_decoder()
            .values()
            .map(|t| t.content.clone())
            .filter(|s| !s.is_empty())
            .collect();
        let env = match &manifest.chat_template {
            Some(file) => {
                let path = manifest.dir().join(file);
                let source = std::fs::read_to_string(&path).map_err(|source| RuntimeError::Io {
                    path: path.clone(),
                    source,
                })?;
                Some(template_env(source).map_err(|e| tokenizer_error(&path, e))?)
            }
            None => None,
        };
        let t = &manifest.tokenizer;
        let mut loaded = Self {
            tokenizer,
            text_tokenizer,
            env,
            special_strings,
            bos_token: t.bos_token.clone().unwrap_or_default(),
            eos_token: t.eos_token.clone().unwrap_or_default(),
            bos_token_id: t.bos_token_id,
            add_bos_token: t.add_bos_token,
            user_turn: None,
            system_turn: None,
            one_turn_prefix: Vec::new(),
            vocabulary_bytes: OnceLock::new(),
        };
        loaded.user_turn = loaded.turn_markers("user");
        loaded.system_turn = loaded.turn_markers("system");
        // a template that refuses a lone user turn has no such prefix
        loaded.one_turn_prefix = loaded.find_one_turn_prefix().unwrap_or_default();
        Ok(loaded)
    }

    /// The common start of two one-turn chats that differ only in their content.
    fn find_one_turn_prefix(&self) -> Result<Vec<u32>> {
        if self.env.is_none() {
            return Ok(Vec::new());
        }
        let one_turn = |content: &str| self.encode_chat(&[ChatMessage::new("user", content)], true);
        let (a, b) = (one_turn("a")?, one_turn("b")?);
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        Ok(a[..common].to_vec())
    }

    /// Where the user's own content starts in `ids`: after the template's one-turn prefix when
    /// `ids` starts with it and goes on past it, else 0.
    pub fn user_content_start(&self, ids: &[u32]) -> usize {
        let n = self.one_turn_prefix.len();
        if n > 0 && ids.len() > n && ids.starts_with(&self.one_turn_prefix) {
            n
        } else {
            0
        }
    }

    /// The template itself says what a `role` turn looks like: the text from the last special
    /// token before a rendered message's content to the first one after it.
    fn turn_markers(&self, role: &str) -> Option<(String, String)> {
        const MARK: &str = "\u{E000}";
        let rendered = self
            .render_inner(&[ChatMessage::new(role, MARK)], false)
            .ok()?;
        let (before, after) = rendered.split_once(MARK)?;
        let opener = self
            .special_strings
            .iter()
            .filter_map(|sp| before.rfind(sp.as_str()))
            .max()
            .map(|i| &before[i..])?;
        let closer = self
            .special_strings
            .iter()
            .filter_map(|sp| after.find(sp.as_str()).map(|i| (i, sp.as_str())))
            .min()
            .map(|(i, sp)| &after[..i + sp.len()])?;
        Some((opener.to_owned(), closer.to_owned()))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.env.is_some()
    }

    /// Render messages with the chat template, as text (special-token strings typed by users
    /// included verbatim). For display and debugging; [`Self::encode_chat`] is what generation
    /// uses.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_inner(messages, add_generation_prompt)
    }

    fn render_inner(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = self.env.as_ref().ok_or_else(|| {
            RuntimeError::Input("this model has no chat template; send a plain prompt".into())
        })?;
        let template = env
            .get_template("chat")
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        template
            .render(context! {
                messages => messages_value(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                // raise_exception() in a template: the messages are not acceptable to this model
                ErrorKind::InvalidOperation => RuntimeError::Input(format!("chat template: {e}")),
                _ => RuntimeError::Tokenizer(format!("chat template: {e:#}")),
            })
    }

    /// Token ids of a chat, rendered with the template; user-typed special-token strings are
    /// text.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), self.escape_specials(&m.content)))
            .collect();
        let rendered = self.render_inner(&escaped, add_generation_prompt)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(open) = rest.find(SENTINEL_OPEN) {
            ids.extend(self.encode_with(&self.tokenizer, &rest[..open])?);
            let after = &rest[open + SENTINEL_OPEN.len_utf8()..];
            let close = after.find(SENTINEL_CLOSE).ok_or_else(|| {
                RuntimeError::Tokenizer("chat template split a special-token escape".into())
            })?;
            let special = after[..close]
                .parse::<usize>()
                .ok()
                .and_then(|i| self.special_strings.get(i))
                .ok_or_else(|| RuntimeError::Tokenizer("bad special-token escape".into()))?;
            ids.extend(self.encode_with(&self.text_tokenizer, special)?);
            rest = &after[close + SENTINEL_CLOSE.len_utf8()..];
        }
        ids.extend(self.encode_with(&self.tokenizer, rest)?);
        Ok(ids)
    }

    /// Token ids of a raw prompt (no template): special-token strings in it are control tokens
    /// (see the module doc); BOS is prepended when the tokenizer is configured to add it.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.add_bos_token
            && let Some(bos) = self.bos_token_id
        {
            ids.push(bos);
        }
        ids.extend(self.encode_with(&self.tokenizer, text)?);
        Ok(ids)
    }

    /// A raw prompt spelling this model's chat template, split at its last user turn (from the
    /// last `<|im_start|>user\n` to the `<|im_end|>` after it, or the end): what comes before
    /// the turn, its content, and what comes after it (`None` when the turn is not closed);
    /// `None` when the text spells no user turn.
    fn at_last_user_turn<'t>(&self, text: &'t str) -> Option<(&'t str, &'t str, Option<&'t str>)> {
        let (opener, closer) = self.user_turn.as_ref()?;
        let at = text.rfind(opener.as_str())?;
        let content = &text[at + opener.len()..];
        Some(match content.find(closer.as_str()) {
            Some(end) => (
                &text[..at],
                &content[..end],
                Some(&content[end + closer.len()..]),
            ),
            None => (&text[..at], content, None),
        })
    }

    /// The content of the last user turn that a raw prompt spells in this model's chat
    /// template, or `None` when it spells none.
    pub fn last_user_turn(&self, text: &str) -> Option<String> {
        self.at_last_user_turn(text)
            .map(|(_, content, _)| content.to_owned())
    }

    /// The contents of the system turns a raw prompt spelling this model's chat template writes
    /// before its last user turn (none when it spells no user turn).
    pub fn system_turns(&self, text: &str) -> Vec<String> {
        let (Some((before, _, _)), Some((opener, closer))) =
            (self.at_last_user_turn(text), &self.system_turn)
        else {
            return Vec::new();
        };
        let mut turns = Vec::new();
        let mut rest = before;
        while let Some(start) = rest.find(opener.as_str()) {
            rest = &rest[start + opener.len()..];
            let stop = rest.find(closer.as_str()).unwrap_or(rest.len());
            turns.push(rest[..stop].to_owned());
            rest = &rest[stop..];
        }
        turns
    }

    /// What a raw prompt spelling this model's chat template writes after its last user turn
    /// (turns of other roles, an assistant prefill), with special-token strings and lines that
    /// only name a role taken out; `None` when that leaves nothing, or the text spells no user
    /// turn. The model reads those turns right before it answers, so the gate must too.
    pub fn after_last_user_turn(&self, text: &str) -> Option<String> {
        // the API's roles, and the one Llama 3's template adds
        let is_role = |line: &str| MESSAGE_ROLES.contains(&line) || line == "ipython";
        let (_, _, after) = self.at_last_user_turn(text)?;
        let mut rest = after?.to_owned();
        for special in &self.special_strings {
            rest = rest.replace(special.as_str(), "\n");
        }
        let kept: Vec<&str> = rest.lines().filter(|line| !is_role(line.trim())).collect();
        let kept = kept.join("\n").trim().to_owned();
        (!kept.is_empty()).then_some(kept)
    }

    /// Text of `ids` with special tokens spelled out (the raw prompt they encode).
    pub fn decode_raw(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    /// Token ids of text that continues a rendered prompt (e.g. an assistant prefill): plain
    /// text, no BOS.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(&self.text_tokenizer, text)
    }

    /// Every token's bytes, by id, as llguidance reads them from `tokenizer.json` (byte-level
    /// BPE or byte fallback): a special token is its text behind llguidance's marker byte.
    /// Built on first use (~0.1 s for 49k tokens); an error says why this tokenizer's tokens
    /// cannot be read as bytes.
    pub fn vocabulary_bytes(&self) -> std::result::Result<&[Vec<u8>], String> {
        let built = self.vocabulary_bytes.get_or_init(|| {
            let json = self.tokenizer.to_string(false).map_err(|e| e.to_string())?;
            let json: serde_json::Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())
        });
        built.as_deref().map_err(Clone::clone)
    }

    /// The bytes token `id` stands for (a special token: its text), e.g. for OpenAI's
    /// log-probabilities. Bytes of part of a character are that part, not a replacement
    /// character; without [`Self::vocabulary_bytes`], the token's decoded text.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let marker = llguidance::toktrie::TokTrie::SPECIAL_TOKEN_MARKER;
        match self
            .vocabulary_bytes()
            .ok()
            .and_then(|v| v.get(id as usize))
        {
            Some(b) if b.first() == Some(&marker) => b[1..].to_vec(),
            Some(b) if !b.is_empty() => b.clone(),
            _ => self.decode_raw(&[id]).unwrap_or_default().into_bytes(),
        }
    }

    /// Text of `ids`, without special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))
    }

    fn encode_with(&self, tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = tokenizer
            .encode(text, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Replace every special-token string in `text` by a sentinel naming it.
    fn escape_specials(&self, text: &str) -> String {
        if !self
            .special_strings
            .iter()
            .any(|s| text.contains(s.as_str()))
        {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while !rest.is_empty() {
            for (i, special) in self.special_strings.iter().enumerate() {
                if let Some(tail) = rest.strip_prefix(special.as_str()) {
                    out.push(SENTINEL_OPEN);
                    out.push_str(&i.to_string());
                    out.push(SENTINEL_CLOSE);
                    rest = tail;
                    continue 'scan;
                }
            }
            let c = rest.chars().next().expect("rest is not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

/// Messages as template values: a list of `{role, content}` maps, as transformers passes them.
fn messages_value(messages: &[ChatMessage]) -> minijinja::Value {
    let list: Vec<minijinja::Value> = messages
        .iter()
        .map(|m| {
            minijinja::Value::from_pairs([
                ("role", minijinja::Value::from(m.role.as_str())),
                ("content", minijinja::Value::from(m.content.as_str())),
            ])
        })
        .collect();
    minijinja::Value::from(list)
}

fn template_env(source: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // transformers renders chat templates with trim_blocks and lstrip_blocks on.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned("chat", source)?;
    Ok(env)
}

/// Turns a stream of token ids into a stream of text deltas, never splitting a UTF-8 character
/// (a byte-level token may hold part of one) and keeping decoder spacing right by decoding each
/// new token with a little left context.
#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// Add one token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &ChatTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let complete = full.len() > prefix.len() && !full.ends_with('\u{FFFD}');
        if complete
            && full.starts_with(&prefix)
            && let Some(delta) = full.get(prefix.len()..)
        {
            let delta = delta.to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(delta));
        }
        Ok(None)
    }

    /// Text still held back at the end of a sequence (e.g. an incomplete UTF-8 character,
    /// which decodes to U+FFFD), so that the streamed text equals decoding every token.
    pub fn flush(&mut self, tokenizer: &ChatTokenizer) -> Result<String> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .strip_prefix(prefix.as_str())
            .map(str::to_owned)
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, messages: &[ChatMessage]) -> String {
        let env = template_env(template.to_owned()).expect("template compiles");
        env.get_template("chat")
            .expect("registered")
            .render(context! {
                messages => messages_value(messages),
                add_generation_prompt => true,
                bos_token => "<s>",
            })
            .expect("renders")
    }

    #[test]
    fn templates_get_python_string_methods_and_hf_whitespace_rules() {
        // Llama-3-style: .strip(), .upper(), startswith, loop controls, trim_blocks.
        let template = "{{ bos_token }}{% for m in messages %}\n\
            {% if m['role'].startswith('sys') %}[{{ m['role'].upper() }}]{% endif %}\n\
            <{{ m['role'] }}>{{ m['content'].strip() }}</{{ m['role'] }}>\n\
            {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        let out = render(
            template,
            &[
                ChatMessage::new("system", "  be brief  "),
                ChatMessage::new("user", "hi\n"),
            ],
        );
        // The expected string is what Python's jinja2 renders with transformers' settings.
        assert_eq!(
            out,
            "<s>[SYSTEM]<system>be brief</system>\n<user>hi</user>\n<assistant>"
        );
    }

    #[test]
    fn raise_exception_is_an_input_error_message() {
        let env = template_env(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                .to_owned(),
        )
        .expect("compiles");
        let err = env
            .get_template("chat")
            .expect("registered")
            .render(context! { messages => messages_value(&[ChatMessage::new("assistant", "x")]) })
            .expect_err("raises");
        assert_eq!(err.kind(), ErrorKind::InvalidOperation);
        assert!(err.to_string().contains("first must be user"));
    }
}
