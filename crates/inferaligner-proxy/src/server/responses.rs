//! `/v1/responses` answers the sidecar writes: chat's answer, rewritten as a Response
//! ([`openai::responses`]). Forwarded answers are the upstream's own Responses; errors have
//! the same body on both APIs.

use super::*;
use openai::responses::{EventStream, response};

/// `answer` (chat's, to the `/v1/responses` body `request`) as a Response: a whole one
/// rewritten, a stream rewritten event by event as it goes. Answers from the upstream and
/// errors pass as they are.
pub(super) async fn as_response(answer: Response<Body>, request: &Bytes) -> Response<Body> {
    let forwarded = answer
        .headers()
        .get("x-inferaligner-action")
        .is_some_and(|a| a == action_str(ActionLabel::forward));
    if forwarded || answer.status() != StatusCode::OK {
        return answer;
    }
    let request: Value = serde_json::from_slice(request).unwrap_or_default();
    let streamed = answer
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
    let (parts, body) = answer.into_parts();
    if !streamed {
        let whole = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error_response(&ProxyError::Model(e.to_string()), 1),
        };
        let chat: Value = serde_json::from_slice(&whole).unwrap_or_default();
        let mut rewritten = json_response(StatusCode::OK, &response(&chat, &request));
        for (name, value) in &parts.headers {
            if name != header::CONTENT_LENGTH && name != header::CONTENT_TYPE {
                rewritten.headers_mut().insert(name, value.clone());
            }
        }
        return rewritten;
    }
    // The chat stream is read as it comes and each of its events rewritten; when the client
    // leaves, the send fails, the task drops the chat body, and generation is cancelled.
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    tokio::spawn(async move {
        let mut body = body;
        let mut events = EventStream::new(request);
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|f| f.into_data().unwrap_or_default()) else {
                break;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&event);
                let out: Vec<u8> = text
                    .lines()
                    .filter_map(|line| line.strip_prefix("data: "))
                    .flat_map(|data| events.push(data))
                    .collect();
                if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                    return;
                }
            }
        }
    });
    let mut rewritten = sse_response(Body::new(PassBody { rx, _guard: None }));
    for (name, value) in &parts.headers {
        rewritten.headers_mut().insert(name, value.clone());
    }
    rewritten
}
