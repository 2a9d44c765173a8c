//! OpenAI API shapes as vLLM, TGI and llama.cpp serve them: request parsing (wrong types a
//! 400; fields the local generator cannot honour, known or not, noted for a 400 by name) and
//! response / SSE chunk building.

mod fields;
mod request;
mod response;
mod tools;

pub use request::{ApiRequest, parse_request, split_prompts};
pub use response::{ResponseMeta, SSE_DONE, finish_reason, sse, with_index, with_logprobs};

/// Which endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
}

impl Endpoint {
    /// Stable label (metrics, spans).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "text_completion",
        }
    }

    /// The route.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

#[cfg(test)]
mod tests;
