//! `upstream.passthrough`: routes of the upstream that write no text pass through ungated;
//! every other route stays the sidecar's (gated) or a 404.

use std::time::Duration;

use inferaligner_e2e::sidecar::*;
use inferaligner_proxy::ServeMode;
use serde_json::json;
use wiremock::matchers::{body_json, header, method, path, path_regex, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// GET a route of the sidecar's API port.
async fn get(h: &inferaligner::serve::ServerHandle, route: &str) -> (u16, String, String) {
    let r = reqwest::get(format!("http://{}{route}", h.api))
        .await
        .expect("sent");
    let action = r
        .headers()
        .get("x-inferaligner-action")
        .map(|v| v.to_str().expect("text").to_owned())
        .unwrap_or_default();
    (r.status().as_u16(), action, r.text().await.expect("body"))
}

/// The status line of a GET sent byte for byte, the path as written.
async fn raw_get(addr: std::net::SocketAddr, route: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {route} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_routes_reach_the_upstream_as_sent_and_no_other_does() {
    let upstream = MockServer::start().await;
    let embedding =
        r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.5,-0.25]}]}"#;
    Mock::given(method("POST"))
        .and(path("/v1/embeddings"))
        .and(query_param("encoding", "float"))
        .and(header("authorization", "Bearer key"))
        .and(body_json(json!({"model": "tiny-llama", "input": "hello"})))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(embedding, "application/json")
                .insert_header("x-upstream", "yes"),
        )
        .expect(1)
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .and(path("/health"))
        .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
        .mount(&upstream)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/files/"))
        .respond_with(ResponseTemplate::new(404).set_body_string("no such file"))
        .mount(&upstream)
        .await;
    let mut c = config(ServeMode::Proxy, &upstream.uri());
    c.upstream.passthrough = vec![
        "/v1/embeddings".into(),
        "/health".into(),
        "/v1/files/*".into(),
    ];
    c.server.max_body_bytes = 2048;
    let h = start(c).await;

    // as sent: method, path, query, the client's headers (not its forged decision headers)
    // and body; the upstream's answer comes back whole, marked as passed through, ungated
    let body = json!({"model": "tiny-llama", "input": "hello"}).to_string();
    let forged = ("x-inferaligner-action", "forward");
    let auth = ("authorization", "Bearer key");
    let a = post(&h, "/v1/embeddings?encoding=float", body, &[auth, forged]).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.body, embedding.as_bytes());
    assert_eq!(a.header("x-upstream"), "yes");
    assert_eq!(a.header("x-inferaligner-action"), "passthrough");
    assert_eq!(a.header("x-inferaligner-gate"), "", "no gate ran");
    let received = upstream.received_requests().await.expect("recorded");
    assert!(
        received[0]
            .headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-inferaligner-")),
        "{:?}",
        received[0].headers
    );
    // other methods and prefixes; the upstream's own errors come back as it wrote them
    assert_eq!(
        get(&h, "/health").await,
        (200, "passthrough".into(), "ok".into())
    );
    let file = get(&h, "/v1/files/f-1").await;
    assert_eq!(file, (404, "passthrough".into(), "no such file".into()));

    // not listed: the sidecar's 404, the upstream not asked
    let asked = upstream.received_requests().await.expect("recorded").len();
    for route in ["/v1/embeddings/x", "/tokenize", "/v1/files", "/metrics"] {
        let (status, action, body) = get(&h, route).await;
        assert_eq!((status, action.as_str()), (404, ""), "{route}: {body}");
    }
    // nor a way out of a listed prefix (sent raw: HTTP clients resolve `..` themselves)
    for route in [
        "/v1/files/../chat/completions",
        "/v1/files/%2e%2e/chat/completions",
    ] {
        let head = raw_get(h.api, route).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{route}: {head}");
    }
    let asked_after = upstream.received_requests().await.expect("recorded").len();
    assert_eq!(
        asked_after, asked,
        "unlisted routes never reach the upstream"
    );
    // the body limit holds on passed routes too
    let big = json!({"input": "x".repeat(4096)}).to_string();
    let too_big = post(&h, "/v1/embeddings", big, &[]).await;
    assert_eq!(too_big.status, 413);
    assert_eq!(too_big.header("x-inferaligner-origin"), "sidecar");
    // the sidecar's routes stay gated
    let gated = ask(&h, &chat("What is the capital of France?"), None).await;
    assert_ne!(gated.header("x-inferaligner-gate"), "");
    let counted = "inferaligner_requests_total{decision=\"off\",action=\"passthrough\"}";
    assert_eq!(metric(&h, counted).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_route_whose_upstream_is_down_or_slow_is_a_gateway_error() {
    let upstream = MockServer::start().await;
    Mock::given(path("/tokenize"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&upstream)
        .await;
    let mut c = config(ServeMode::Proxy, &upstream.uri());
    c.upstream.passthrough = vec!["/tokenize".into()];
    c.upstream.read_timeout_s = 0.3;
    let h = start(c).await;
    let slow = post(&h, "/tokenize", "{}", &[]).await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.json()["error"]["type"], "upstream_timeout");

    let mut c = config(ServeMode::Proxy, &closed_port_url().await);
    c.upstream.passthrough = vec!["/tokenize".into()];
    let h = start(c).await;
    let down = post(&h, "/tokenize", "{}", &[]).await;
    assert_eq!(down.status, 502);
    assert_eq!(down.header("x-inferaligner-origin"), "sidecar");
}

#[tokio::test]
async fn a_route_that_writes_text_or_a_local_sidecar_cannot_pass_through() {
    for (mode, entry, named) in [
        (ServeMode::Proxy, "/v1/*", "/v1/chat/completions"),
        (ServeMode::Proxy, "/generate", "generate text"),
        (ServeMode::Local, "/v1/embeddings", "proxy"),
    ] {
        let mut c = config(mode, "http://127.0.0.1:9");
        c.upstream.passthrough = vec![entry.into()];
        let e = inferaligner::serve::spawn(c, None).await.expect_err(entry);
        assert!(e.to_string().contains(named), "{entry}: {e}");
    }
}
