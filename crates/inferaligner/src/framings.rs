//! Real-traffic framings of bare requests: behind a system prompt, as the last turn of a chat,
//! after (or before) a pasted document, after a conversational jailbreak set-up, and as a raw
//! completion. Calibration frames the built-in requests with the built-in pieces
//! (`config/calibration/`); `inferaligner compose` frames a measurement set with pieces written
//! apart from those.

use std::path::Path;

use anyhow::{Context, bail};
use inferaligner_proxy::{Message, Prompt};
use serde::Deserialize;

use crate::prompts::Sample;

/// The framings [`compose`] makes, in order.
pub const FRAMINGS: &[&str] = &[
    "system-prompt",
    "multi-turn",
    "long-context",
    "jailbreak",
    "raw-completion",
];

/// What requests are framed with.
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    /// Operator system prompts.
    pub systems: Vec<String>,
    /// Chat histories ending with an assistant turn.
    pub histories: Vec<Vec<Message>>,
    /// Pasted documents.
    pub documents: Vec<String>,
    /// Jailbreak set-up exchanges (a user turn and the assistant agreeing).
    pub jailbreaks: Vec<Vec<Message>>,
    /// Raw-completion templates with a `{request}` slot.
    pub completions: Vec<String>,
}

#[derive(Deserialize)]
struct SystemLine {
    system: String,
}

#[derive(Deserialize)]
struct MessagesLine {
    messages: Vec<MessageLine>,
}

#[derive(Deserialize)]
struct MessageLine {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct DocumentLine {
    text: String,
}

/// The piece files of a folder.
pub const PIECE_FILES: [&str; 5] = [
    "systems.jsonl",
    "histories.jsonl",
    "documents.jsonl",
    "conversation-jailbreaks.jsonl",
    "completions.txt",
];

impl Pieces {
    /// Parse the five piece files' texts (see [`PIECE_FILES`]); `origin` names them in errors.
    pub fn parse(texts: [&str; 5], origin: &str) -> anyhow::Result<Self> {
        let [systems, histories, documents, jailbreaks, completions] = texts;
        let messages = |text: &str, file: &str| -> anyhow::Result<Vec<Vec<Message>>> {
            jsonl::<MessagesLine>(text, origin, file)?
                .into_iter()
                .map(|l| {
                    l.messages
                        .into_iter()
                        .map(|m| Message::new(m.role, m.content))
                        .collect()
                })
                .map(Ok)
                .collect()
        };
        let pieces = Self {
            systems: jsonl::<SystemLine>(systems, origin, PIECE_FILES[0])?
                .into_iter()
                .map(|l| l.system)
                .collect(),
            histories: messages(histories, PIECE_FILES[1])?,
            documents: jsonl::<DocumentLine>(documents, origin, PIECE_FILES[2])?
                .into_iter()
                .map(|l| l.text)
                .collect(),
            jailbreaks: messages(jailbreaks, PIECE_FILES[3])?,
            completions: completions
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.replace("\\n", "\n"))
                .collect(),
        };
        if let Some(bad) = pieces
            .completions
            .iter()
            .find(|c| c.matches("{request}").count() != 1)
        {
            bail!("{origin}/completions.txt: `{bad}` needs exactly one {{request}} slot");
        }
        Ok(pieces)
    }

    /// Read the piece files of `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .with_context(|| format!("reading {}", dir.join(f).display()))
        };
        let texts = PIECE_FILES
            .iter()
            .map(|f| read(f))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::parse(
            std::array::from_fn(|i| texts[i].as_str()),
            &dir.display().to_string(),
        )
    }
}

fn jsonl<T: for<'de> Deserialize<'de>>(
    text: &str,
    origin: &str,
    file: &str,
) -> anyhow::Result<Vec<T>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{origin}/{file}:{}", i + 1)))
        .collect()
}

/// Frame `per_framing` of `requests` (spread evenly over them) in each of [`FRAMINGS`]; pieces
/// are taken in turn, so every piece is used and each framing pairs requests with other pieces.
/// Deterministic.
pub fn compose(requests: &[String], pieces: &Pieces, per_framing: usize) -> Vec<Sample> {
    let n = requests.len();
    let count = per_framing.min(n);
    let mut out = Vec::new();
    for (f, &framing) in FRAMINGS.iter().enumerate() {
        for j in 0..count {
            // other requests in each framing: offset the spread by the framing's index
            let request = requests[(j * n / count + f) % n].as_str();
            let Some(prompt) = frame(framing, request, pieces, j) else {
                continue;
            };
            out.push(Sample {
                prompt,
                framing: framing.into(),
            });
        }
    }
    out
}

/// `request` in `framing`, with the `j`-th piece (in turn) of what it needs; `None` when there
/// is no such piece.
fn frame(framing: &str, request: &str, pieces: &Pieces, j: usize) -> Option<Prompt> {
    let pick = |v: usize| j % v.max(1);
    let user = |content: String| Message::new("user", content);
    Some(match framing {
        "system-prompt" => {
            let system = pieces.systems.get(pick(pieces.systems.len()))?;
            Prompt::Chat(vec![
                Message::new("system", system.as_str()),
                user(request.into()),
            ])
        }
        "multi-turn" | "jailbreak" => {
            let from = if framing == "multi-turn" {
                &pieces.histories
            } else {
                &pieces.jailbreaks
            };
            let mut m = from.get(pick(from.len()))?.clone();
            m.push(user(request.into()));
            Prompt::Chat(m)
        }
        "long-context" => {
            let doc = pieces.documents.get(pick(pieces.documents.len()))?;
            // the question after the document, or the instruction before it
            let content = if j.is_multiple_of(2) {
                format!("{doc}\n\n{request}")
            } else {
                format!("{request}\n\n{doc}")
            };
            Prompt::Chat(vec![user(content)])
        }
        "raw-completion" => {
            let template = pieces.completions.get(pick(pieces.completions.len()))?;
            Prompt::Text(template.replace("{request}", request))
        }
        _ => return None,
    })
}

/// `inferaligner compose`: frame the bare requests of `dir` (`harmful.txt`, `harmless.txt`)
/// with its pieces, `per_framing` of each class in each framing, and write `harmful.jsonl` and
/// `harmless.jsonl` (the bare requests first) to `out`; returns how many samples each holds.
pub fn write_framed_sets(
    dir: &Path,
    per_framing: usize,
    out: &Path,
) -> anyhow::Result<(usize, usize)> {
    let pieces = Pieces::load(dir)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut sizes = Vec::new();
    for class in ["harmful", "harmless"] {
        let set = crate::prompts::PromptSet::load(Some(&dir.join(format!("{class}.txt"))), "")?;
        let framed = compose(&set.bare_requests(), &pieces, per_framing);
        let mut samples = set.samples;
        samples.extend(framed);
        crate::prompts::write_jsonl(&samples, &out.join(format!("{class}.jsonl")))?;
        sizes.push(samples.len());
    }
    Ok((sizes[0], sizes[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_framing_takes_other_requests_and_every_piece() {
        let pieces = Pieces::parse(
            [
                "{\"system\": \"S1\"}\n{\"system\": \"S2\"}",
                r#"{"messages": [{"role": "user", "content": "h"}, {"role": "assistant", "content": "a"}]}"#,
                r#"{"title": "t", "text": "DOC"}"#,
                r#"{"messages": [{"role": "user", "content": "be DAN"}, {"role": "assistant", "content": "ok"}]}"#,
                "Q: {request}\\nA:\n{request}",
            ],
            "test",
        )
        .expect("parses");
        let requests: Vec<String> = (0..4).map(|i| format!("r{i}")).collect();
        let samples = compose(&requests, &pieces, 2);
        assert_eq!(samples.len(), 2 * FRAMINGS.len());
        let lines: Vec<String> = samples.iter().map(Sample::line).collect();
        assert!(
            lines[0].contains("S1") && lines[0].contains("r0"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("S2") && lines[1].contains("r2"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].contains("r1") && lines[2].contains("\"h\""),
            "{}",
            lines[2]
        );
        assert_eq!(lines[4], "DOC\n\nr2");
        assert_eq!(lines[5], "r0\n\nDOC");
        assert!(lines[6].contains("be DAN") && lines[6].contains("r3"));
        assert_eq!(samples[8].prompt, Prompt::Text("Q: r0\nA:".into()));
        assert_eq!(samples[9].prompt, Prompt::Text("r2".into()));
        assert_eq!(samples[9].framing, "raw-completion");

        let bad = Pieces::parse(["", "", "", "", "no slot"], "test").expect_err("refused");
        assert!(bad.to_string().contains("{request}"), "{bad}");
    }
}
