//! OpenAI API shapes as vLLM, TGI and llama.cpp serve them: request parsing (wrong types a
//! 400; fields the local generator cannot honour, known or not, noted for a 400 by name) and
//! response / SSE chunk building.

mod fields;
mod request;
mod response;
pub mod responses;
mod tools;

pub use request::{ApiRequest, in_responses_words, parse_request, split_prompts};
pub use response::{ResponseMeta, SSE_DONE, finish_reason, sse, with_index, with_logprobs};

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
    /// `/v1/responses`: read as the chat request it amounts to, answered as a Response
    /// ([`responses`]).
    Responses,
}

impl Endpoint {
    /// Stable label (metrics, spans).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "text_completion",
            Self::Responses => "responses",
        }
    }

    /// The route.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Responses => "/v1/responses",
        }
    }
}

#[cfg(test)]
mod tests;
