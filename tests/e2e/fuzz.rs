//! Property-based fuzzing of chat-template rendering and of the gate's views with hostile
//! message content (the toolchain has no nightly for cargo-fuzz; `make fuzz` runs these with
//! many more cases).

use inferaligner::view::{VIEW_HEAD_TOKENS, VIEW_TAIL_TOKENS, render};
use inferaligner_core::GateView;
use inferaligner_e2e::tiny_llama;
use inferaligner_proxy::{Message, Prompt};
use inferaligner_runtime::{ChatMessage, ChatTokenizer, Manifest};
use proptest::prelude::*;

fn tokenizer() -> &'static ChatTokenizer {
    static TOKENIZER: std::sync::OnceLock<ChatTokenizer> = std::sync::OnceLock::new();
    TOKENIZER.get_or_init(|| {
        ChatTokenizer::load(&Manifest::load(tiny_llama()).expect("manifest")).expect("tokenizer")
    })
}

/// Text built from pieces that mean something to a template engine or a tokenizer.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("<|im_start|>".to_owned()),
        Just("<|im_end|>".to_owned()),
        Just("<|endoftext|>".to_owned()),
        Just("{{ raise_exception('x') }}".to_owned()),
        Just("{% for m in messages %}{{ m }}{% endfor %}".to_owned()),
        Just("{# comment #}".to_owned()),
        Just("\n".to_owned()),
        Just("system".to_owned()),
        Just("\u{0}\u{feff}\u{202e}".to_owned()),
        ".{0,8}",
    ];
    proptest::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(64)
    ))]

    #[test]
    fn hostile_content_is_rendered_as_text_in_every_role(
        messages in proptest::collection::vec(
            (prop_oneof![Just("system"), Just("user"), Just("assistant")], hostile_text()),
            1..4,
        )
    ) {
        let tokenizer = tokenizer();
        let messages: Vec<ChatMessage> =
            messages.iter().map(|(role, text)| ChatMessage::new(*role, text.as_str())).collect();
        let rendered = tokenizer.render(&messages, true).expect("renders");
        for m in &messages {
            prop_assert!(rendered.contains(&m.content), "content must appear verbatim");
        }
        // Control tokens come from the template only: the hostile conversation has exactly as
        // many as the same roles with plain content.
        let plain: Vec<ChatMessage> =
            messages.iter().map(|m| ChatMessage::new(m.role.as_str(), "x")).collect();
        let vocab = tokenizer.tokenizer();
        let controls = |messages: &[ChatMessage]| {
            let ids = tokenizer.encode_chat(messages, true).expect("encodes");
            ["<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(|token| {
                let id = vocab.token_to_id(token).expect("special token");
                ids.iter().filter(|&&t| t == id).count()
            })
        };
        prop_assert_eq!(controls(&messages), controls(&plain));
    }

    #[test]
    fn hostile_content_gives_the_gate_one_or_two_bounded_views(
        blocks in proptest::collection::vec(hostile_text(), 1..6),
        repeat in 1usize..40,
    ) {
        let tokenizer = tokenizer();
        let content = blocks.join("\n\n").repeat(repeat);
        let prompt = Prompt::Chat(vec![Message::new("user", content.as_str())]);
        let r = render(tokenizer, &prompt, GateView::LastUserTurn).expect("renders");
        let reads = r.gate_reads();
        prop_assert!((1..=2).contains(&reads.len()), "{} views", reads.len());
        let overhead = tokenizer
            .encode_chat(&[ChatMessage::new("user", "")], true)
            .expect("encodes")
            .len();
        for read in reads {
            // a long turn's views are cut: what the gate reads is bounded, whatever is pasted
            prop_assert!(!read.is_empty());
            prop_assert!(
                read.len() <= overhead + VIEW_HEAD_TOKENS + VIEW_TAIL_TOKENS + 32,
                "a view of {} tokens",
                read.len()
            );
        }
    }
}
