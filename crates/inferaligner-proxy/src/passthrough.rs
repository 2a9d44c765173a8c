//! Routes of the upstream that `proxy` mode passes through ungated (`upstream.passthrough`):
//! those that write no text — embeddings, tokenizing, health — so that clients of the model
//! server keep them when the sidecar becomes the pod's only way in. A route that writes text is
//! never one of them: the sidecar's own routes are gated, and the known generation routes of
//! the usual upstreams are refused when listed, so a broad entry cannot open a way around the
//! gate.

use crate::ProxyError;

/// The sidecar's own routes: gated (or answered) here, never passed through. A route ending
/// in `/` stands for everything under it.
const SERVED: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/v1/models/",
];

/// Routes where the usual upstreams write text: vLLM's and llama.cpp's Anthropic-style
/// messages, TGI's generate, llama.cpp's native completion and infill, the OpenAI routes without
/// their `/v1`, SageMaker's invocations (vLLM), Ollama's generate and chat, the legacy engines
/// routes (everything under `/v1/engines/`).
const GENERATING: [&str; 11] = [
    "/v1/messages",
    "/generate",
    "/generate_stream",
    "/completion",
    "/completions",
    "/chat/completions",
    "/infill",
    "/invocations",
    "/api/generate",
    "/api/chat",
    "/v1/engines/",
];

/// The configured pass-through routes: exact paths, or prefixes written `/prefix/*`.
#[derive(Debug, Clone, Default)]
pub struct Passthrough {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Passthrough {
    /// Read `upstream.passthrough`; an entry that is not a path, or that would pass a route
    /// that writes text, is a config error naming it.
    pub fn new(entries: &[String]) -> Result<Self, ProxyError> {
        let mut routes = Self::default();
        for entry in entries {
            let bad = |why: &str| {
                Err(ProxyError::Config(format!(
                    "upstream.passthrough `{entry}`: {why}"
                )))
            };
            // `plain` refuses percent-encoding, backslashes and dot or empty segments
            let well_formed = entry.starts_with('/')
                && !entry.chars().any(|c| c.is_whitespace() || "?#".contains(c))
                && plain(entry.trim_end_matches('*'))
                && entry.matches('*').count() <= 1
                && (!entry.contains('*') || entry.ends_with("/*"));
            if !well_formed {
                return bad("write a path (`/v1/embeddings`) or a prefix ending in `/*`");
            }
            let one = Self::entry(entry);
            if let Some(route) = SERVED.iter().find(|r| one.covers(r)) {
                return bad(&format!(
                    "`{route}` is the sidecar's own route (gated), never passed through"
                ));
            }
            if let Some(route) = GENERATING.iter().find(|r| one.covers(r)) {
                return bad(&format!(
                    "`{route}` is where upstreams generate text: it would pass ungated"
                ));
            }
            routes.exact.extend(one.exact);
            routes.prefixes.extend(one.prefixes);
        }
        Ok(routes)
    }

    fn entry(entry: &str) -> Self {
        match entry.strip_suffix('*') {
            Some(prefix) => Self {
                exact: Vec::new(),
                prefixes: vec![prefix.to_owned()],
            },
            None => Self {
                exact: vec![entry.to_owned()],
                prefixes: Vec::new(),
            },
        }
    }

    /// Whether a request to `path` is passed through. Under a prefix only a plain path is:
    /// an upstream that resolves `..` or decodes `%2F` would otherwise read
    /// `/v1/files/../chat/completions` as a route that writes text.
    pub fn matches(&self, path: &str) -> bool {
        self.exact.iter().any(|e| e == path)
            || self
                .prefixes
                .iter()
                .any(|p| path.starts_with(p.as_str()) && plain(path))
    }

    /// Whether these routes would pass `route`, or (for a route ending in `/`) anything under
    /// it: a prefix above it or inside it.
    fn covers(&self, route: &str) -> bool {
        match route.strip_suffix('/') {
            Some(_) => {
                self.exact.iter().any(|e| e.starts_with(route))
                    || self
                        .prefixes
                        .iter()
                        .any(|p| p.starts_with(route) || route.starts_with(p.as_str()))
            }
            None => self.matches(route),
        }
    }

    /// No route is passed through.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// A path without dot segments, empty segments (but a trailing `/`), backslashes or
/// percent-encoded characters.
fn plain(path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    !path.contains(['%', '\\'])
        && (segments.iter().enumerate())
            .all(|(i, s)| !matches!(*s, "." | "..") && (!s.is_empty() || i == last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(entries: &[&str]) -> Result<Passthrough, String> {
        let entries: Vec<String> = entries.iter().map(|e| (*e).to_owned()).collect();
        Passthrough::new(&entries).map_err(|e| e.to_string())
    }

    #[test]
    fn listed_paths_and_prefixes_pass_and_nothing_else() {
        let p = routes(&["/v1/embeddings", "/tokenize", "/v1/files/*"]).expect("valid");
        for path in ["/v1/embeddings", "/tokenize", "/v1/files/abc", "/v1/files/"] {
            assert!(p.matches(path), "{path}");
        }
        for path in [
            "/v1/embeddings/x",
            "/v1/embedding",
            "/tokenizer",
            "/v1/files",
            "/v1/chat/completions",
            "/",
            // no way out of a prefix
            "/v1/files/../chat/completions",
            "/v1/files/./x",
            "/v1/files//x",
            "/v1/files/%2e%2e/chat/completions",
            "/v1/files/..%2Fchat%2Fcompletions",
            "/v1/files/..\\chat",
        ] {
            assert!(!p.matches(path), "{path}");
        }
        assert!(routes(&[]).expect("valid").is_empty());
    }

    #[test]
    fn routes_that_write_text_cannot_be_listed() {
        for (entry, named) in [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/*", "/v1/chat/completions"),
            ("/*", "/v1/chat/completions"),
            ("/v1/models", "/v1/models"),
            ("/v1/models/*", "/v1/models/"),
            ("/v1/models/m", "/v1/models/"),
            ("/v1/messages", "/v1/messages"),
            ("/generate", "/generate"),
            ("/api/*", "/api/generate"),
            ("/v1/engines/*", "/v1/engines/"),
            ("/v1/engines/davinci/completions", "/v1/engines/"),
        ] {
            let e = routes(&["/health", entry]).expect_err(entry);
            assert!(e.contains(entry) && e.contains(named), "{entry}: {e}");
        }
        for entry in [
            "v1/embeddings",
            "/v1/*/x",
            "/v1/emb*",
            "/a b",
            "/x?y=1",
            "/**",
            "/v1/files/../*",
            "/v1//x",
            "",
        ] {
            let e = routes(&[entry]).expect_err(entry);
            assert!(e.contains("write a path"), "{entry}: {e}");
        }
    }
}
