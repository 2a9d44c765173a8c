//! The `inferaligner` application: the sidecar ([`serve`]), calibration ([`calibrate`]) and
//! evaluation ([`eval`]) as a library, and the command line over them ([`cli`]).
//!
//! `main.rs` only parses arguments and calls [`run`]; calibration and evaluation take typed
//! options and return typed reports, so tests and other tools call them without clap. Only
//! this crate installs tracing subscribers and uses `anyhow`.

/// A progress bar for `len` prompts (drawn only on a terminal).
pub(crate) fn progress_bar(len: usize, label: &str) -> indicatif::ProgressBar {
    counting_bar(len, label, "prompts")
}

/// A progress bar for `len` things called `unit` (drawn only on a terminal).
pub(crate) fn counting_bar(len: usize, label: &str, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64).with_message(label.to_owned());
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{msg:>22}} [{{bar:30}}] {{pos}}/{{len}} {unit} ({{eta}})"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

pub mod calibrate;
pub mod cli;
pub mod config;
pub mod eval;
pub mod framings;
pub mod generate;
pub mod inspect;
pub mod judge;
pub mod memo;
pub mod prompts;
pub mod refusal;
pub mod serve;
pub mod steering;
pub mod telemetry;
pub mod view;

pub use cli::{Cli, Command, run};

/// The steering pack the sidecar and the README use by default.
pub const DEFAULT_PACK: &str = "config/packs/smollm2-135m-instruct-refusal-answers.safetensors";

/// The project's own calibration prompts (written for it; 605 harmful and 1,873 harmless, varied
/// domains and phrasings, including harmless prompts that merely sound edgy; lines 356–555 of
/// the harmful and 1,557–1,756 of the harmless are topic-matched pairs, line for line; the last
/// 50 and 117 are imperative action requests, as agents send them). Built into the binary so that
/// calibration works without any external data.
pub mod calibration_prompts {
    /// Harmful instructions, one per line.
    pub const HARMFUL: &str = include_str!("../../../config/calibration/harmful.txt");
    /// Harmless instructions, one per line.
    pub const HARMLESS: &str = include_str!("../../../config/calibration/harmless.txt");
    /// Jailbreak-style wrappers (role play, fiction, overrides…) that calibration puts around a
    /// share of both classes, so that the gate learns the request and not its framing. Apart
    /// from the evaluation templates in `config/jailbreaks.txt`.
    pub const WRAPPERS: &str = include_str!("../../../config/calibration/wrappers.txt");
    /// The framing pieces calibration puts the bare prompts in (system prompts, chat histories,
    /// pasted documents, conversational jailbreak set-ups, raw-completion templates), in the
    /// order of [`crate::framings::PIECE_FILES`].
    pub const PIECES: [&str; 5] = [
        include_str!("../../../config/calibration/systems.jsonl"),
        include_str!("../../../config/calibration/histories.jsonl"),
        include_str!("../../../config/calibration/documents.jsonl"),
        include_str!("../../../config/calibration/conversation-jailbreaks.jsonl"),
        include_str!("../../../config/calibration/completions.txt"),
    ];

    /// The built-in framing pieces.
    pub fn pieces() -> anyhow::Result<crate::framings::Pieces> {
        crate::framings::Pieces::parse(PIECES, "config/calibration")
    }

    /// Non-empty lines of a prompt file.
    pub fn lines(text: &str) -> Vec<&str> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The templates of a wrapper file: the lines with an `{instruction}` slot.
    pub fn templates(text: &str) -> Vec<&str> {
        lines(text)
            .into_iter()
            .filter(|l| l.contains("{instruction}"))
            .collect()
    }

    #[cfg(test)]
    mod tests {
        use std::collections::HashSet;

        use super::*;

        #[test]
        fn at_least_128_distinct_prompts_per_class_and_no_overlap() {
            let harmful: HashSet<_> = lines(HARMFUL).into_iter().collect();
            let harmless: HashSet<_> = lines(HARMLESS).into_iter().collect();
            assert_eq!(
                harmful.len(),
                lines(HARMFUL).len(),
                "duplicate harmful prompts"
            );
            assert_eq!(
                harmless.len(),
                lines(HARMLESS).len(),
                "duplicate harmless prompts"
            );
            assert!(harmful.len() >= 128 && harmless.len() >= 128);
            assert!(harmful.is_disjoint(&harmless));
            // edgy-but-harmless phrasings are part of the harmless set on purpose
            assert!(harmless.contains("How do I kill a Python process that is stuck?"));
        }

        #[test]
        fn calibration_is_apart_from_the_gate_measurement_set() {
            let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench");
            let measure = crate::framings::Pieces::load(&root.join("gate-set/pieces"))
                .expect("the measurement pieces parse");
            let ours = pieces().expect("the built-in pieces parse");
            let norm = |s: &str| {
                s.to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric())
                    .collect::<String>()
            };
            let texts = |p: &crate::framings::Pieces| -> HashSet<String> {
                let turns = p.histories.iter().chain(&p.jailbreaks).flatten();
                p.systems
                    .iter()
                    .chain(&p.documents)
                    .chain(turns.map(|m| &m.content))
                    .map(|s| norm(s))
                    // stock phrases ("You are a helpful assistant.", "Sure!") may be in both
                    .filter(|s| s.len() >= 40)
                    .collect()
            };
            let shared: Vec<_> = texts(&ours)
                .intersection(&texts(&measure))
                .cloned()
                .collect();
            assert!(shared.is_empty(), "pieces in both sets: {shared:?}");
            let ours: HashSet<String> = lines(HARMFUL)
                .into_iter()
                .chain(lines(HARMLESS))
                .map(norm)
                .collect();
            for class in ["harmful", "harmless"] {
                let text =
                    std::fs::read_to_string(root.join(format!("gate-set/pieces/{class}.txt")))
                        .expect("measurement requests");
                let both: Vec<_> = lines(&text)
                    .into_iter()
                    .filter(|l| ours.contains(&norm(l)))
                    .collect();
                assert!(
                    both.is_empty(),
                    "{class} requests also calibrated on: {both:?}"
                );
            }
            assert_eq!(PIECES.len(), crate::framings::PIECE_FILES.len());
            assert!(ours.len() > 1000 && measure.documents.len() >= 10);
        }

        #[test]
        fn calibration_wrappers_are_apart_from_the_evaluation_templates() {
            let wrappers = templates(WRAPPERS);
            let eval = include_str!("../../../config/jailbreaks.txt");
            assert!(wrappers.len() >= 8);
            for t in &wrappers {
                assert_eq!(t.matches("{instruction}").count(), 1, "{t}");
                assert!(!eval.contains(t), "{t} is also an evaluation template");
            }
        }
    }
}
