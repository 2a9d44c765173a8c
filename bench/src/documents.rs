//! Long prompts for the benchmarks: this repository's own docs, pasted before a question the
//! way a retrieval-style request pastes a document.

use inferaligner_runtime::{ChatMessage, ChatTokenizer};

/// The text documents are cut from (about 12k SmolLM2 tokens).
pub const DOCS: &str = concat!(
    include_str!("../../docs/operations.md"),
    include_str!("../../docs/sidecar.md"),
    include_str!("../../docs/benchmarks.md"),
    include_str!("../../README.md"),
);

/// The user message: `DOCS` from token `offset`, cut so that the rendered chat prompt has at
/// most `tokens` tokens, then `question`.
pub fn document_message(
    tokenizer: &ChatTokenizer,
    question: &str,
    tokens: usize,
    offset: usize,
) -> anyhow::Result<String> {
    let question_len = tokenizer
        .encode_chat(&[ChatMessage::new("user", question)], true)?
        .len();
    let doc_ids = tokenizer.encode_text(DOCS)?;
    let offset = offset % doc_ids.len();
    let available = doc_ids.len() - offset;
    anyhow::ensure!(
        available + question_len >= tokens,
        "the docs hold {available} tokens after offset {offset}; ask for fewer"
    );
    let mut take = tokens.saturating_sub(question_len);
    loop {
        let document = tokenizer.decode(&doc_ids[offset..offset + take])?;
        let message = format!("{document}\n\n{question}");
        let n = tokenizer
            .encode_chat(&[ChatMessage::new("user", message.as_str())], true)?
            .len();
        if n <= tokens || take == 0 {
            return Ok(message);
        }
        take -= (n - tokens).min(take);
    }
}
