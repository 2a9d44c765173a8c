use serde_json::{Value, json};

use super::*;
use inferaligner_core::{FinishReason, ResponseFormat};

use crate::ProxyError;
use crate::backend::Prompt;

#[test]
fn chat_requests_parse_with_unknown_fields_ignored() {
    let r = parse_request(
        Endpoint::Chat,
        br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"Hi "},{"type":"text","text":"there"}]}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":5,
            "temperature":0,"stop":"\n","logit_bias":{},"user":"u1"}"#,
    )
    .expect("parses");
    assert!(r.stream && r.include_usage);
    assert_eq!(r.max_tokens, Some(5));
    assert_eq!(r.stop, vec!["\n".to_string()]);
    assert_eq!(r.sampling.temperature, 0.0);
    let Prompt::Chat(m) = r.prompt else {
        panic!("chat prompt")
    };
    assert_eq!(m[1].content, "Hi there");
}

#[test]
fn wrong_types_and_values_are_client_errors() {
    for (body, needle) in [
        (&br#"{"messages":"hi"}"#[..], "invalid type"),
        (br#"{"messages":[]}"#, "must not be empty"),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"5"}"#,
            "invalid type",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
            "temperature",
        ),
        (
            br#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
            "text only",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}"#,
            "not valid JSON: EOF while parsing a list at line 1 column 42",
        ),
        (
            br#"{"messages":[{"role":"user","content":"\uzz00 x"}]}"#,
            "not valid JSON: invalid escape at line 1 column 45",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"n":0}"#,
            "`n` must be at least 1",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"best_of":0}"#,
            "`best_of` must be at least 1",
        ),
    ] {
        let e = parse_request(Endpoint::Chat, body).expect_err("rejected");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains(needle), "{e}");
    }
}

#[test]
fn type_errors_name_the_field_in_json_terms_without_echoing_the_value() {
    for (body, field, needle) in [
        (
            &br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"my secret"}"#[..],
            "max_tokens",
            "expected a non-negative integer",
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"stop":5}"#,
            "stop",
            "expected a string or an array of strings",
        ),
        (
            br#"{"messages":[{"role":"user","content":7}]}"#,
            "messages",
            "content",
        ),
        (br#"{"messages":"hello there"}"#, "messages", "an array"),
    ] {
        let e = parse_request(Endpoint::Chat, body).expect_err("rejected");
        let text = e.to_string();
        assert!(text.contains(needle), "{text}");
        assert_eq!(e.body()["error"]["param"], field, "{text}");
        for leak in [
            "my secret",
            "hello there",
            "u64",
            "untagged",
            "OneOrMany",
            "Content",
        ] {
            assert!(!text.contains(leak), "{text}");
        }
    }
}

#[test]
fn answer_shaping_fields_are_noted_not_rejected() {
    // parsing keeps them (a forwarded request carries them to the upstream); where the
    // sidecar answers itself, `refuse_unsupported` names the first
    let r = parse_request(
        Endpoint::Chat,
        br#"{"messages":[{"role":"user","content":"x"}],"n":17,"tools":[{"type":"custom","custom":{"name":"x"}}]}"#,
    )
    .expect("parses");
    assert_eq!(r.unsupported.as_deref(), Some("n"));
    let e = r.refuse_unsupported().expect_err("refused");
    assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    assert_eq!(e.body()["error"]["param"], "n");
    let neutral = parse_request(
        Endpoint::Completions,
        br#"{"prompt":"x","logprobs":0,"echo":false,"best_of":1,"response_format":{"type":"text"}}"#,
    )
    .expect("parses");
    assert_eq!(neutral.unsupported, None);
    assert!(neutral.refuse_unsupported().is_ok());
    // fields the sidecar does not know are refused by name too; known no-effect fields pass
    let unknown = parse_request(
        Endpoint::Chat,
        br#"{"messages":[{"role":"user","content":"x"}],"user":"u","store":false,"min_p":0.1}"#,
    )
    .expect("parses");
    let e = unknown.refuse_unsupported().expect_err("refused");
    assert_eq!(e.body()["error"]["param"], "min_p");
    assert!(e.to_string().contains("not a request field"), "{e}");
    let known = parse_request(
        Endpoint::Chat,
        br#"{"messages":[{"role":"user","content":"x"}],"user":"u","metadata":{"a":"b"},"min_p":null}"#,
    )
    .expect("parses");
    assert!(known.refuse_unsupported().is_ok());
    // OpenAI's fields the generator cannot honour are refused as such, not as unknown
    let verbose = parse_request(
        Endpoint::Chat,
        br#"{"messages":[{"role":"user","content":"x"}],"verbosity":"low"}"#,
    )
    .expect("parses");
    let e = verbose.refuse_unsupported().expect_err("refused");
    assert_eq!(e.body()["error"]["param"], "verbosity");
    assert!(e.to_string().contains("not supported"), "{e}");
}

#[test]
fn the_end_user_is_the_safety_identifier_or_the_older_user_field() {
    let end_user = |fields: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{fields}}}"#);
        parse_request(Endpoint::Chat, body.as_bytes())
            .expect("parses")
            .end_user
    };
    assert_eq!(end_user(""), None);
    assert_eq!(end_user(r#","user":"u1""#).as_deref(), Some("u1"));
    assert_eq!(
        end_user(r#","user":"u1","safety_identifier":"s1""#).as_deref(),
        Some("s1")
    );
    assert_eq!(end_user(r#","safety_identifier":"""#), None);
    let completions = parse_request(
        Endpoint::Completions,
        br#"{"prompt":"x","safety_identifier":"s2"}"#,
    )
    .expect("parses");
    assert_eq!(completions.end_user.as_deref(), Some("s2"));
}

#[test]
fn messages_roles_and_each_endpoints_fields_are_checked() {
    let chat = |body: &str| parse_request(Endpoint::Chat, body.as_bytes());
    for (body, needle) in [
        (
            r#"{"messages":[{"role":"wizard","content":"hi"}]}"#,
            "`messages[0].role` must be one of",
        ),
        (
            r#"{"messages":[{"role":"user"}]}"#,
            "`messages[0].content` is required",
        ),
        (
            r#"{"messages":[{"role":"user","content":null}]}"#,
            "is required",
        ),
        (
            r#"{"messages":[{"role":"user","content":[]}]}"#,
            "must not be an empty array",
        ),
        (
            r#"{"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
            "`messages[0].content[0]` is of type `text` but has no `text`",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"prompt":"y"}"#,
            "takes `messages`",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"user":5}"#,
            "`user`",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"parallel_tool_calls":"x"}"#,
            "`parallel_tool_calls`",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
            "only allowed when `stream` is true",
        ),
    ] {
        let e = chat(body).expect_err(body);
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains(needle), "{e}");
    }
    let e = parse_request(Endpoint::Completions, br#"{"prompt":"x","messages":[]}"#)
        .expect_err("a chat field");
    assert_eq!(e.body()["error"]["param"], "messages");
    // an assistant turn may carry only tool calls, `stream: null` is no stream, and what an SDK
    // round-trips empty asks for nothing
    let r = chat(
        r#"{"messages":[{"role":"user","content":"x"},{"role":"assistant","content":null,
            "refusal":null,"annotations":[]},{"role":"user","content":"y"}],"stream":null}"#,
    )
    .expect("parses");
    assert_eq!((r.stream, r.unsupported), (false, None));
    // message fields the generator cannot honour are refused by name where it writes the answer
    for (body, field) in [
        (
            r#"{"messages":[{"role":"user","content":"x","name":"ann"}]}"#,
            "messages[0].name",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"custom",
                "custom":{"name":"x"}}]}"#,
            "tools[0].type",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function",
                "function":{"name":"f","x-vendor":1}}]}"#,
            "tools[0].function.x-vendor",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function",
                "function":{"name":"f"}}],"tool_choice":{"type":"allowed_tools"}}"#,
            "tool_choice.type",
        ),
        (
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"x",
                "cache_control":{"type":"ephemeral"}}]}]}"#,
            "messages[0].content[0].cache_control",
        ),
        (
            r#"{"messages":[{"role":"user","content":"x"}],"stream":true,
                "stream_options":{"continuous_usage_stats":true}}"#,
            "stream_options.continuous_usage_stats",
        ),
    ] {
        let r = chat(body).expect("parses");
        assert_eq!(r.unsupported.as_deref(), Some(field));
        let e = r.refuse_unsupported().expect_err("refused");
        assert!(e.to_string().contains("is not supported"), "{e}");
    }
}

/// The 400 for a chat body made of `fields` (JSON object members; a user message is added
/// unless they hold `messages`).
fn refused_chat(fields: &str) -> ProxyError {
    let body = if fields.starts_with(r#""messages""#) {
        format!("{{{fields}}}")
    } else {
        format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{fields}}}"#)
    };
    let e = parse_request(Endpoint::Chat, body.as_bytes()).expect_err(&body);
    assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    e
}

#[test]
fn tools_are_read_into_the_prompt_and_the_answer_grammar() {
    let chat = |body: &str| parse_request(Endpoint::Chat, body.as_bytes());
    let weather = r#"{"type":"function","function":{"name":"get_weather",
        "description":"Weather in a city","parameters":{"type":"object",
        "properties":{"city":{"type":"string"}},"required":["city"]},"strict":true}}"#;
    let r = chat(&format!(
        r#"{{"messages":[{{"role":"system","content":"You help travellers."}},
            {{"role":"user","content":"Weather in Oslo?"}},
            {{"role":"assistant","content":null,"tool_calls":[{{"id":"call_1","type":"function",
                "function":{{"name":"get_weather","arguments":"{{\"city\": \"Oslo\"}}"}}}}]}},
            {{"role":"tool","tool_call_id":"call_1","content":"4 C, rain"}},
            {{"role":"user","content":"And in Rome?"}}],
            "tools":[{weather}],"parallel_tool_calls":false}}"#
    ))
    .expect("parses");
    assert_eq!(r.unsupported, None);
    assert_eq!(r.tools.choice, inferaligner_core::ToolChoice::Auto);
    assert!(r.tools.may_call() && !r.tools.parallel);
    assert!(matches!(r.response_format, ResponseFormat::Grammar { .. }));
    // the request's system prompt, then the tools; earlier calls and results as the model
    // writes and reads them
    let Prompt::Chat(m) = &r.prompt else {
        panic!("a chat")
    };
    assert!(
        m[0].content.starts_with("You help travellers.\n\n# Tools"),
        "{}",
        m[0].content
    );
    assert!(m[0].content.contains(r#""name":"get_weather""#));
    assert_eq!(
        m[2].content,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>"
    );
    assert_eq!(m[3].content, "<tool_response>\n4 C, rain\n</tool_response>");
    // without a system message the tools are one; `none` shows none and holds nothing
    let r = chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}],
            "tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}}}"#
    ))
    .expect("parses");
    let Prompt::Chat(m) = &r.prompt else {
        panic!("a chat")
    };
    assert_eq!((m.len(), m[0].role.as_str()), (2, "system"));
    assert!(r.tools.must_call());
    let none = chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}],"tool_choice":"none"}}"#
    ))
    .expect("parses");
    assert_eq!(none.response_format, ResponseFormat::Text);
    assert!(matches!(&none.prompt, Prompt::Chat(m) if m.len() == 1));
    assert!(none.steerable(true), "an answer that cannot call is text");
    assert!(
        !r.steerable(false),
        "an answer that may call is not steered"
    );
    // a call cannot also be held to a JSON format
    let both = chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":[{weather}],
            "response_format":{{"type":"json_object"}}}}"#
    ))
    .expect("parses");
    assert_eq!(both.unsupported.as_deref(), Some("response_format"));
    // malformed tools are 400s whichever server answers
    for (body, needle) in [
        (r#""tools":{}"#, "`tools` must be an array"),
        (
            r#""tools":[{"type":"function"}]"#,
            "`tools[0].function` must be an object",
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"a b"}}]"#,
            "`tools[0].function.name` must be 1 to 64",
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"f","parameters":[]}}]"#,
            "`tools[0].function.parameters` must be a JSON Schema object",
        ),
        (
            r#""tools":[{"type":"function","function":{"name":"f"}},{"type":"function","function":{"name":"f"}}]"#,
            "two functions are named `f`",
        ),
        (r#""tool_choice":"sometimes""#, "`tool_choice` must be"),
        (r#""tool_choice":"required""#, "has no `tools`"),
        (
            r#""tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":{"type":"function","function":{"name":"g"}}"#,
            "not in `tools`",
        ),
        (
            r#""messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"1"}]}]"#,
            "`messages[0].tool_calls` entries need a `function`",
        ),
        (
            r#""messages":[{"role":"tool","content":"x","tool_call_id":7}]"#,
            "`messages[0].tool_call_id` must be a string",
        ),
    ] {
        let e = refused_chat(body);
        assert!(e.to_string().contains(needle), "{e}");
    }
    // raw completions have no tools: only an upstream may take them
    let raw = parse_request(
        Endpoint::Completions,
        br#"{"prompt":"x","tools":[{"type":"function","function":{"name":"f"}}]}"#,
    )
    .expect("parses");
    assert_eq!(raw.unsupported.as_deref(), Some("tools"));
}

#[test]
fn legacy_functions_are_read_as_tools_with_one_call_an_answer() {
    let chat = |body: &str| parse_request(Endpoint::Chat, body.as_bytes());
    let weather = r#"{"name":"get_weather","description":"Weather in a city",
        "parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}"#;
    // a chat written in the legacy form: an assistant's `function_call`, a `function` result
    let r = chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"Weather in Oslo?"}},
            {{"role":"assistant","content":null,
                "function_call":{{"name":"get_weather","arguments":"{{\"city\": \"Oslo\"}}"}}}},
            {{"role":"function","name":"get_weather","content":"4 C, rain"}},
            {{"role":"user","content":"And in Rome?"}}],
            "functions":[{weather}],"function_call":{{"name":"get_weather"}}}}"#
    ))
    .expect("parses");
    assert_eq!(r.unsupported, None);
    assert!(r.functions);
    assert_eq!(
        r.tools.choice,
        inferaligner_core::ToolChoice::Function("get_weather".into())
    );
    assert!(!r.tools.parallel, "one call an answer");
    assert!(matches!(r.response_format, ResponseFormat::Grammar { .. }));
    assert!(
        !r.steerable(false),
        "an answer that may call is not steered"
    );
    // the same prompt as the same chat written with tools
    let with_tools = chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"Weather in Oslo?"}},
            {{"role":"assistant","content":null,"tool_calls":[{{"id":"call_1","type":"function",
                "function":{{"name":"get_weather","arguments":"{{\"city\": \"Oslo\"}}"}}}}]}},
            {{"role":"tool","tool_call_id":"call_1","content":"4 C, rain"}},
            {{"role":"user","content":"And in Rome?"}}],
            "tools":[{{"type":"function","function":{weather}}}],
            "tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}},
            "parallel_tool_calls":false}}"#
    ))
    .expect("parses");
    assert_eq!(r.prompt, with_tools.prompt);
    assert_eq!(r.tools, with_tools.tools);
    assert_eq!(r.response_format, with_tools.response_format);
    assert!(!with_tools.functions);
    // "none" shows no functions; "auto" or nothing lets the model choose
    let choice = |call: &str| {
        chat(&format!(
            r#"{{"messages":[{{"role":"user","content":"x"}}],"functions":[{weather}]{call}}}"#
        ))
        .expect("parses")
        .tools
        .choice
    };
    assert_eq!(
        choice(r#","function_call":"none""#),
        inferaligner_core::ToolChoice::None
    );
    assert_eq!(
        choice(r#","function_call":"auto""#),
        inferaligner_core::ToolChoice::Auto
    );
    assert_eq!(choice(""), inferaligner_core::ToolChoice::Auto);
    // `function_call` without functions asks nothing unless it names one
    let plain = chat(r#"{"messages":[{"role":"user","content":"x"}],"function_call":"none"}"#)
        .expect("parses");
    assert!(plain.unsupported.is_none() && !plain.functions && !plain.tools.may_call());
    // malformed or mixed with tools: 400s naming the field
    let f = r#""functions":[{"name":"f"}]"#;
    for (body, param, needle) in [
        (
            r#""functions":{}"#.to_owned(),
            "functions",
            "`functions` must be an array",
        ),
        (
            r#""functions":[{"name":"a b"}]"#.into(),
            "functions",
            "`functions[0].name` must be 1 to 64",
        ),
        (
            r#""functions":[{"name":"f"},{"name":"f"}]"#.into(),
            "functions",
            "two functions are named `f`",
        ),
        (
            r#""functions":[{"name":"f","parameters":3}]"#.into(),
            "functions",
            "`functions[0].parameters` must be a JSON Schema object",
        ),
        (
            format!(r#"{f},"function_call":"required""#),
            "function_call",
            "`function_call` must be",
        ),
        (
            format!(r#"{f},"function_call":{{"name":"g"}}"#),
            "function_call",
            "not in `functions`",
        ),
        (
            format!(r#"{f},"tools":[{{"type":"function","function":{{"name":"g"}}}}]"#),
            "functions",
            "cannot both be given",
        ),
        (
            format!(r#"{f},"tool_choice":"auto""#),
            "tool_choice",
            "use `function_call`",
        ),
        (
            format!(r#"{f},"parallel_tool_calls":true"#),
            "parallel_tool_calls",
            "at most one call",
        ),
        (
            r#""function_call":{"name":"f"}"#.into(),
            "function_call",
            "goes with legacy `functions`",
        ),
        (
            r#""messages":[{"role":"function","content":"4 C"}]"#.into(),
            "messages",
            "`messages[0].name` (a string) is required",
        ),
        (
            r#""messages":[{"role":"assistant","content":null,"function_call":{"name":"f"}}]"#
                .into(),
            "messages",
            "`messages[0].function_call` needs a `name` and `arguments`",
        ),
    ] {
        let e = refused_chat(&body);
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(e.body()["error"]["param"], param, "{body}");
    }
    // `parallel_tool_calls: false` says what legacy functions do anyway
    chat(&format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],{f},"parallel_tool_calls":false}}"#
    ))
    .expect("parses");
    // on raw completions only an upstream may take them
    let raw = parse_request(
        Endpoint::Completions,
        br#"{"prompt":"x","functions":[{"name":"f"}]}"#,
    )
    .expect("parses");
    assert_eq!(raw.unsupported.as_deref(), Some("functions"));
}

#[test]
fn tool_calls_have_the_openai_shape() {
    let m = ResponseMeta::new(Endpoint::Chat, "m".into());
    let calls = [inferaligner_core::ToolCall {
        name: "get_weather".into(),
        arguments: r#"{"city":"Rome"}"#.into(),
    }];
    let whole = m.calls(&calls, "tool_calls", (3, 4));
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Rome"}"#);
    let call = m.calls_chunk(&calls, 0, true);
    assert_eq!(call["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(call["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
    // a stream's later calls are numbered on from the ones it sent before
    let later = m.calls_chunk(&calls, 2, false);
    assert_eq!(later["choices"][0]["delta"]["role"], Value::Null);
    assert_eq!(later["choices"][0]["delta"]["tool_calls"][0]["index"], 2);
    let end = m.calls_end("tool_calls");
    assert_eq!(end["choices"][0]["finish_reason"], "tool_calls");
    // legacy functions: the call as `function_call`, finished for it
    let legacy = ResponseMeta {
        functions: true,
        ..m
    };
    assert_eq!(legacy.calls_finish_reason(), "function_call");
    let whole = legacy.calls(&calls, legacy.calls_finish_reason(), (3, 4));
    assert_eq!(
        whole["choices"][0]["message"],
        json!({"role": "assistant", "content": null,
            "function_call": {"name": "get_weather", "arguments": r#"{"city":"Rome"}"#}})
    );
    assert_eq!(whole["choices"][0]["finish_reason"], "function_call");
    let (call, end) = (
        legacy.calls_chunk(&calls, 0, true),
        legacy.calls_end("function_call"),
    );
    assert_eq!(
        call["choices"][0]["delta"],
        json!({"role": "assistant", "content": null,
            "function_call": {"name": "get_weather", "arguments": r#"{"city":"Rome"}"#}})
    );
    assert_eq!(end["choices"][0]["finish_reason"], "function_call");
}

#[test]
fn half_a_surrogate_pair_reads_as_a_replacement_character() {
    let content = |body: &[u8]| {
        let b = super::request::json_body(body).expect("parses");
        b["c"].as_str().expect("a string").to_owned()
    };
    // JavaScript's JSON.stringify of text cut between an emoji's halves, both ways round
    assert_eq!(content(br#"{"c":"a\ud83d b"}"#), "a\u{fffd} b");
    assert_eq!(content(br#"{"c":"\ude00x\ud83d"}"#), "\u{fffd}x\u{fffd}");
    // a whole pair, an escaped backslash before `ud800` text, other escapes: as they are
    assert_eq!(content(br#"{"c":"\ud83d\ude00"}"#), "😀");
    let b = super::request::json_body(br#"{"c":"\\ud800","d":"\n\"\ud800\\"}"#).expect("parses");
    assert_eq!(b["c"], "\\ud800");
    assert_eq!(b["d"], "\n\"\u{fffd}\\");
}

#[test]
fn completions_take_one_prompt() {
    let r = parse_request(Endpoint::Completions, br#"{"prompt":["Once"]}"#).expect("parses");
    assert_eq!(r.prompt, Prompt::Text("Once".into()));
    assert!(parse_request(Endpoint::Completions, br#"{"prompt":["a","b"]}"#).is_err());
    // an empty prompt is the client's error, named
    for body in [
        br#"{"prompt":""}"#.as_slice(),
        br#"{"prompt":[""]}"#,
        br#"{"prompt":[]}"#,
    ] {
        let e = parse_request(Endpoint::Completions, body).expect_err("empty");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("`prompt` must not be empty"), "{e}");
    }
}

#[test]
fn chunks_have_the_openai_shape() {
    let m = ResponseMeta::new(Endpoint::Chat, "m".into());
    let first = m.chunk("He", true, None);
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last = m.chunk("", false, Some(FinishReason::Length));
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(m.usage_chunk((3, 4))["usage"]["total_tokens"], 7);
    assert_eq!(sse(&json!({"a":1})), "data: {\"a\":1}\n\n");
}

/// Any JSON value, nested a few levels.
fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request object whose known keys hold arbitrary values.
fn request_like() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let keys = prop_oneof![
        Just("messages"),
        Just("prompt"),
        Just("model"),
        Just("stream"),
        Just("stream_options"),
        Just("max_tokens"),
        Just("max_completion_tokens"),
        Just("temperature"),
        Just("top_p"),
        Just("top_k"),
        Just("seed"),
        Just("stop"),
        Just("n"),
        Just("frequency_penalty"),
        Just("presence_penalty"),
        Just("repetition_penalty"),
        Just("echo"),
        Just("best_of"),
        Just("logprobs"),
        Just("role"),
        Just("content"),
        // the Responses API's
        Just("input"),
        Just("instructions"),
        Just("text"),
        Just("tools"),
        Just("tool_choice"),
        Just("max_output_tokens"),
        Just("truncation"),
    ];
    let message = (
        prop_oneof![
            Just("user".to_owned()),
            Just("system".to_owned()),
            ".{0,6}".prop_map(|s: String| s)
        ],
        any_json(),
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    (
        proptest::collection::btree_map(keys, any_json(), 0..8),
        proptest::option::of(proptest::collection::vec(message, 0..3)),
    )
        .prop_map(|(fields, messages)| {
            let mut v: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            if let Some(m) = messages {
                // as chat's messages, or as the Responses API's input items
                let key = if v.contains_key("input") {
                    "input"
                } else {
                    "messages"
                };
                v.insert(key.into(), Value::from(m));
            }
            Value::Object(v)
        })
}

proptest::proptest! {
    // Fuzzing request parsing: whatever arrives is either a request or a client error.
    #[test]
    fn arbitrary_bytes_are_a_request_or_a_400(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
        for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses] {
            if let Err(e) = parse_request(endpoint, &bytes) {
                proptest::prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
            }
        }
    }

    #[test]
    fn hostile_fields_are_a_valid_request_or_a_400(body in request_like()) {
        let bytes = body.to_string().into_bytes();
        for endpoint in [Endpoint::Chat, Endpoint::Completions, Endpoint::Responses] {
            match parse_request(endpoint, &bytes) {
                Ok(r) => {
                    // 0 new tokens only to score the prompt
                    proptest::prop_assert!(r.max_tokens != Some(0) || r.echo);
                    proptest::prop_assert!(!r.echo || endpoint == Endpoint::Completions);
                    // candidates beyond the choices only on completions, and whole
                    proptest::prop_assert!(r.best_of >= r.n);
                    proptest::prop_assert!(
                        r.best_of == r.n || (endpoint == Endpoint::Completions && !r.stream)
                    );
                    proptest::prop_assert!((0.0..=2.0).contains(&r.sampling.temperature));
                    proptest::prop_assert!(r.sampling.top_p > 0.0 && r.sampling.top_p <= 1.0);
                    proptest::prop_assert!(r.stop.len() <= 4);
                }
                Err(e) => proptest::prop_assert_eq!(e.status(), http::StatusCode::BAD_REQUEST),
            }
        }
    }
}

#[test]
fn logprobs_and_logit_bias_are_read_per_endpoint() {
    let chat = |extra: &str| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}]{extra}}}"#);
        parse_request(Endpoint::Chat, body.as_bytes())
    };
    let raw = |extra: &str| {
        let body = format!(r#"{{"prompt":"x"{extra}}}"#);
        parse_request(Endpoint::Completions, body.as_bytes())
    };
    let read = |r: Result<ApiRequest, ProxyError>| r.expect("parses").logprobs;
    assert_eq!(read(chat("")), None);
    assert_eq!(read(chat(r#","logprobs":false,"top_logprobs":null"#)), None);
    assert_eq!(read(chat(r#","logprobs":true"#)), Some(0));
    assert_eq!(
        read(chat(r#","logprobs":true,"top_logprobs":20"#)),
        Some(20)
    );
    assert_eq!(read(raw(r#","logprobs":0"#)), Some(0));
    assert_eq!(read(raw(r#","logprobs":5"#)), Some(5));
    for bad in [
        chat(r#","logprobs":1"#),
        chat(r#","top_logprobs":1"#),
        chat(r#","logprobs":true,"top_logprobs":21"#),
        chat(r#","logprobs":true,"top_logprobs":-1"#),
        raw(r#","logprobs":true"#),
        raw(r#","logprobs":21"#),
        raw(r#","top_logprobs":1"#),
        chat(r#","logit_bias":{"-1":1}"#),
        chat(r#","logit_bias":{"1":"up"}"#),
        chat(r#","logit_bias":{"1":-100.5}"#),
    ] {
        let e = bad.expect_err("refused");
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
    }
    let r = chat(r#","logit_bias":{"7":-100,"12":2.5}"#).expect("parses");
    assert_eq!(
        r.sampling.logit_bias.into_iter().collect::<Vec<_>>(),
        [(7, -100.0), (12, 2.5)]
    );
    assert_eq!(r.unsupported, None);
    // only log-probabilities keep a flagged request from being steered
    assert!(!chat(r#","logprobs":true"#).expect("parses").steerable(true));
    assert!(
        chat(r#","logprobs":true"#)
            .expect("parses")
            .steerable(false)
    );
    assert!(
        chat(r#","logit_bias":{"7":1}"#)
            .expect("parses")
            .steerable(true)
    );
}

#[test]
fn up_to_16_choices_are_written_here_more_only_upstream() {
    let chat = |n: u32| {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"n":{n}}}"#);
        parse_request(Endpoint::Chat, body.as_bytes()).expect("parses")
    };
    assert_eq!((chat(1).n, chat(16).n), (1, 16));
    assert_eq!(chat(16).unsupported, None);
    assert_eq!(chat(17).unsupported.as_deref(), Some("n"));
    let no_n = parse_request(Endpoint::Completions, br#"{"prompt":"x"}"#).expect("parses");
    assert_eq!(no_n.n, 1);
}

#[test]
fn echo_and_best_of_are_read_on_completions_only() {
    let completions = |body: &str| parse_request(Endpoint::Completions, body.as_bytes());
    let r =
        completions(r#"{"prompt":"x","echo":true,"logprobs":1,"max_tokens":0}"#).expect("parses");
    assert!(r.echo);
    assert_eq!((r.max_tokens, r.unsupported), (Some(0), None));
    let r = completions(r#"{"prompt":"x","best_of":3,"n":2}"#).expect("parses");
    assert_eq!((r.best_of, r.n, r.unsupported), (3, 2, None));
    assert_eq!(completions(r#"{"prompt":"x"}"#).expect("parses").best_of, 1);
    // more candidates than the generator writes: only an upstream's
    let many = completions(r#"{"prompt":"x","best_of":17}"#).expect("parses");
    assert_eq!(many.unsupported.as_deref(), Some("best_of"));
    // ranking needs log-probabilities, which a held answer does not have
    let r = completions(r#"{"prompt":"x","best_of":2}"#).expect("parses");
    assert!(!r.steerable(true) && r.steerable(false));
    for (body, param, message) in [
        (
            r#"{"prompt":"x","max_tokens":0}"#,
            "max_tokens",
            "0 only with `echo`",
        ),
        (r#"{"prompt":"x","echo":1}"#, "echo", "true or false"),
        (
            r#"{"prompt":"x","best_of":1,"n":2}"#,
            "best_of",
            "at least `n`",
        ),
        (
            r#"{"prompt":"x","best_of":2,"stream":true}"#,
            "best_of",
            "cannot be streamed",
        ),
        (r#"{"prompt":"x","best_of":"2"}"#, "best_of", "an integer"),
    ] {
        let e = completions(body).expect_err(body);
        assert_eq!(e.body()["error"]["param"], param, "{body}");
        assert!(e.to_string().contains(message), "{body}: {e}");
    }
    // on chat neither is a field: refused by name where the sidecar writes the answer
    for field in [r#""echo":true"#, r#""best_of":2"#] {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{field}}}"#);
        let r = parse_request(Endpoint::Chat, body.as_bytes()).expect("parses");
        assert!(!r.echo && r.best_of == 1, "{body}");
        assert!(r.unsupported.is_some(), "{body}");
    }
}

#[test]
fn a_chat_stream_is_rewritten_into_response_events() {
    use super::responses::EventStream;
    let kinds = |bytes: Vec<u8>| -> Vec<(String, Value)> {
        String::from_utf8(bytes)
            .expect("UTF-8")
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (head, data) = e.split_once('\n').expect("two lines");
                let body: Value =
                    serde_json::from_str(data.strip_prefix("data: ").expect("data")).expect("JSON");
                (
                    head.strip_prefix("event: ").expect("event").to_owned(),
                    body,
                )
            })
            .collect()
    };
    let m = ResponseMeta::new(Endpoint::Responses, "m".into());
    let request = json!({"input": "x", "instructions": "Be brief."});
    let mut s = EventStream::new(request.clone());
    let mut out = Vec::new();
    for chunk in [
        m.chunk("Hel", true, None),
        m.chunk("lo", false, None),
        m.chunk("", false, Some(FinishReason::Length)),
        m.usage_chunk((3, 2)),
    ] {
        out.extend(s.push(&chunk.to_string()));
    }
    out.extend(s.push("[DONE]"));
    let events = kinds(out);
    let names: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",
        ]
    );
    for (i, (_, e)) in events.iter().enumerate() {
        assert_eq!(e["sequence_number"], i);
    }
    assert_eq!(events[6].1["text"], "Hello");
    let end = &events[9].1["response"];
    assert_eq!(end["status"], "incomplete");
    assert_eq!(end["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(end["instructions"], "Be brief.");
    assert_eq!(end["output"][0]["content"][0]["text"], "Hello");
    // the message cut with it is incomplete too, as OpenAI marks it
    assert_eq!(end["output"][0]["status"], "incomplete");
    assert_eq!(events[8].1["item"]["status"], "incomplete");
    assert_eq!(end["usage"]["input_tokens"], 3);
    assert_eq!(end["usage"]["total_tokens"], 5);
    // the whole response of the same answer says the same
    let whole =
        super::responses::response(&m.response("Hello", FinishReason::Length, (3, 2)), &request);
    assert_eq!(whole["output"], end["output"]);
    assert_eq!(whole["usage"], end["usage"]);
    assert_eq!(whole["status"], "incomplete");
    // a failure mid-stream: an `error` event, then the Response failed with it
    let mut s = EventStream::new(request);
    let mut out = s.push(&m.chunk("Hel", true, None).to_string());
    let failure = ProxyError::Model("boom".into()).body();
    out.extend(s.push(&failure.to_string()));
    out.extend(s.push("[DONE]"));
    let events = kinds(out);
    let (last, end) = events.last().expect("events");
    assert_eq!(last, "response.failed");
    assert_eq!(end["response"]["status"], "failed");
    assert!(
        end["response"]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("boom"))
    );
    assert!(events.iter().any(|(k, _)| k == "error"));
    // calls, each in its chunk as it closes, then the end carrying the log-probabilities of
    // the tokens after them: function_call items only, no message
    let calls = |name: &str| {
        vec![inferaligner_core::ToolCall {
            name: name.into(),
            arguments: "{}".into(),
        }]
    };
    let entry = json!([{"token": "x", "logprob": -1.0, "bytes": [120], "top_logprobs": []}]);
    let mut s = EventStream::new(json!({"input": "x"}));
    let mut out = Vec::new();
    for chunk in [
        m.calls_chunk(&calls("a"), 0, true),
        m.calls_chunk(&calls("b"), 1, false),
        super::response::with_logprobs(m.calls_end("length"), json!({"content": entry})),
    ] {
        out.extend(s.push(&chunk.to_string()));
    }
    out.extend(s.push("[DONE]"));
    let events = kinds(out);
    let output = &events.last().expect("events").1["response"]["output"];
    let types: Vec<&str> = output
        .as_array()
        .expect("output")
        .iter()
        .map(|item| item["type"].as_str().expect("type"))
        .collect();
    assert_eq!(types, ["function_call", "function_call"], "{output}");
}

#[test]
fn a_stored_prompts_variables_are_read_after_the_request() {
    let body = json!({"input": "Hi", "prompt": {"id": "pmpt_1", "version": "2", "variables": {
        "city": "Paris",
        "ask": {"type": "input_text", "text": "How do I pick a lock?"},
        "blank": " ",
    }}});
    let r = parse_request(Endpoint::Responses, body.to_string().as_bytes()).expect("parses");
    let Prompt::Chat(m) = &r.prompt else {
        panic!("chat prompt")
    };
    // each read alone (the highest score decides), so their order is no matter
    let mut read: Vec<(&str, &str)> = m
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    read[1..].sort();
    assert_eq!(
        read,
        [
            ("user", "Hi"),
            ("developer", "How do I pick a lock?"),
            ("developer", "Paris"),
        ]
    );
    // the template stays the upstream's to fill: refused where the sidecar writes the answer
    assert_eq!(r.unsupported.as_deref(), Some("prompt"));
    let plain = json!({"input": "Hi", "prompt": {"id": "pmpt_1"}});
    let r = parse_request(Endpoint::Responses, plain.to_string().as_bytes()).expect("parses");
    let Prompt::Chat(m) = &r.prompt else {
        panic!("chat prompt")
    };
    assert_eq!(m.len(), 1);
    for (prompt, says) in [
        (json!("pmpt_1"), "must be an object"),
        (json!({"id": "p", "variables": [1]}), "must be an object"),
        (
            json!({"id": "p", "variables": {"img": {"type": "input_image", "image_url": "x"}}}),
            "only text",
        ),
        (
            json!({"id": "p", "variables": {"q": {"type": "input_text"}}}),
            "needs `text`",
        ),
    ] {
        let body = json!({"input": "Hi", "prompt": prompt});
        let e =
            parse_request(Endpoint::Responses, body.to_string().as_bytes()).expect_err("refused");
        let e = e.body();
        assert_eq!(e["error"]["param"], "prompt", "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap_or("").contains(says),
            "{e}"
        );
    }
}
