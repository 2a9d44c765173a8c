//! A request as the model reads it, and as the gate reads it (its *gate view*). `serve`,
//! `calibrate` and `eval` all render requests here, so a pack is fitted on the tokens the gate
//! reads when serving.

use inferaligner_core::{GateReadout, GateView};
use inferaligner_proxy::{Message, Prompt};
use inferaligner_runtime::{ChatMessage, ChatTokenizer, Result};

/// Tokens of a long last turn the `last-user-turn` view keeps from its start (where an
/// instruction before a pasted document sits)…
pub const VIEW_HEAD_TOKENS: usize = 64;
/// …and from its end (where a question after one sits).
pub const VIEW_TAIL_TOKENS: usize = 192;
/// What stands for the cut middle.
const VIEW_ELISION: &str = "\n[…]\n";

/// A request's tokens for generation and for the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The prompt the model generates from.
    pub tokens: Vec<u32>,
    /// What the gate reads when it is not the prompt itself.
    pub gate_view: Option<Vec<u32>>,
}

impl Rendered {
    /// The tokens the gate reads.
    pub fn gate_tokens(&self) -> &[u32] {
        self.gate_view.as_deref().unwrap_or(&self.tokens)
    }
}

/// The prompt's token ids: a chat rendered with the template, a raw prompt as written, token
/// ids as given (the caller checks them against the vocabulary).
pub fn prompt_tokens(tokenizer: &ChatTokenizer, prompt: &Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::Chat(messages) => tokenizer.encode_chat(&chat_messages(messages), true),
        Prompt::Text(text) => tokenizer.encode_text(text),
        Prompt::Tokens(ids) => Ok(ids.clone()),
    }
}

/// Render a request and its gate view under `view`.
pub fn render(tokenizer: &ChatTokenizer, prompt: &Prompt, view: GateView) -> Result<Rendered> {
    let tokens = prompt_tokens(tokenizer, prompt)?;
    let gate_view = match view {
        GateView::Prompt => None,
        GateView::LastUserTurn => last_user_turn_view(tokenizer, prompt)?,
    }
    .filter(|v| *v != tokens);
    Ok(Rendered { tokens, gate_view })
}

/// The last user turn alone, as a one-turn chat, cut to a head and a tail when long. `None`
/// without a chat template (the gate then reads the prompt).
fn last_user_turn_view(tokenizer: &ChatTokenizer, prompt: &Prompt) -> Result<Option<Vec<u32>>> {
    if !tokenizer.has_chat_template() {
        return Ok(None);
    }
    let raw_turn = |text: &str| {
        tokenizer
            .last_user_turn(text)
            .unwrap_or_else(|| text.into())
    };
    let content = match prompt {
        // The last user message; a chat with none (a system prompt alone) is read whole.
        Prompt::Chat(messages) => match messages.iter().rev().find(|m| m.role == "user") {
            Some(m) => m.content.clone(),
            None => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        },
        Prompt::Text(text) => raw_turn(text),
        Prompt::Tokens(ids) => raw_turn(&tokenizer.decode_raw(ids)?),
    };
    let content = head_and_tail(tokenizer, &content)?;
    Ok(Some(
        tokenizer.encode_chat(&[ChatMessage::new("user", content)], true)?,
    ))
}

/// `text` when it is at most `VIEW_HEAD_TOKENS + VIEW_TAIL_TOKENS` tokens; else its first and
/// last tokens' text around an elision mark.
fn head_and_tail(tokenizer: &ChatTokenizer, text: &str) -> Result<String> {
    let ids = tokenizer.encode_continuation(text)?;
    if ids.len() <= VIEW_HEAD_TOKENS + VIEW_TAIL_TOKENS {
        return Ok(text.to_owned());
    }
    let head = tokenizer.decode(&ids[..VIEW_HEAD_TOKENS])?;
    let tail = tokenizer.decode(&ids[ids.len() - VIEW_TAIL_TOKENS..])?;
    Ok(format!("{head}{VIEW_ELISION}{tail}"))
}

/// Where a gate with `readout` starts its mean over `gate_tokens` (the tokens it reads): the user's
/// own content, after the template's one-turn prefix; `None` when the gate reads the last
/// token alone. Calibration and serving both ask here, so a pack is fitted on the mean it serves.
pub fn mean_from(
    readout: GateReadout,
    tokenizer: &ChatTokenizer,
    gate_tokens: &[u32],
) -> Option<usize> {
    match readout {
        GateReadout::LastToken => None,
        GateReadout::LastAndMean => Some(tokenizer.user_content_start(gate_tokens)),
    }
}

/// API messages as the runtime's.
fn chat_messages(messages: &[Message]) -> Vec<ChatMessage> {
    messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), m.content.as_str()))
        .collect()
}
