//! Prompt sets: built in, plain text lines, or JSONL — one OpenAI request body a line
//! (`messages` with system/user/assistant turns, or a completions `prompt`), or the
//! `instruction` lines of the public sets. Each sample carries its *framing* (bare, behind a
//! system prompt, in a multi-turn chat…) so that figures can be read per framing.

use std::path::Path;

use anyhow::{Context, bail};
use inferaligner_core::{CalibrationSet, canonical_json};
use inferaligner_proxy::{Message, Prompt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::calibration_prompts;

/// One prompt of a set.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The request.
    pub prompt: Prompt,
    /// How the request is framed (`bare`, `system-prompt`, `multi-turn`, `long-context`,
    /// `jailbreak`, `raw-completion`, or a name the file gives).
    pub framing: String,
}

impl Sample {
    /// A bare request: one user message.
    pub fn bare(text: &str) -> Self {
        Self {
            prompt: Prompt::Chat(vec![Message::new("user", text)]),
            framing: "bare".into(),
        }
    }

    /// The request as one line of text: a bare request's message; otherwise its JSON.
    pub fn line(&self) -> String {
        let request = match &self.prompt {
            Prompt::Chat(m) if m.len() == 1 && m[0].role == "user" => return m[0].content.clone(),
            Prompt::Chat(m) => serde_json::json!({ "messages": m }),
            Prompt::Text(t) => serde_json::json!({ "prompt": t }),
            Prompt::Tokens(ids) => serde_json::json!({ "prompt": ids }),
        };
        // canonical: the line goes into the calibration set's sha256
        canonical_json(&request)
    }
}

/// A named prompt set.
#[derive(Debug)]
pub struct PromptSet {
    /// File name, or `builtin`.
    pub name: String,
    /// The samples, in file order.
    pub samples: Vec<Sample>,
}

/// One JSONL line: an OpenAI request body (other fields are ignored), or an `instruction`.
#[derive(Deserialize)]
struct Line {
    instruction: Option<String>,
    messages: Option<Vec<LineMessage>>,
    prompt: Option<String>,
    framing: Option<String>,
}

#[derive(Deserialize, Serialize)]
struct LineMessage {
    role: String,
    content: String,
}

impl PromptSet {
    /// Built-in lines.
    pub fn builtin(text: &str) -> Self {
        Self {
            name: "builtin".into(),
            samples: calibration_prompts::lines(text)
                .into_iter()
                .map(Sample::bare)
                .collect(),
        }
    }

    /// Read a `.jsonl` file (see the module doc) or plain lines; `None` takes `builtin`.
    pub fn load(path: Option<&Path>, builtin: &str) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self::builtin(builtin));
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts from {}", path.display()))?;
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let mut samples = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if jsonl {
                let at = || format!("{}:{}", path.display(), i + 1);
                let v: Line = serde_json::from_str(line)
                    .with_context(|| format!("{}: not a request or instruction", at()))?;
                samples.push(parse_line(v).with_context(at)?);
            } else {
                samples.push(Sample::bare(line.trim()));
            }
        }
        if samples.is_empty() {
            bail!("{}: no prompts", path.display());
        }
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(Self { name, samples })
    }

    /// Put `system` before every chat that has no system message of its own (the operator's
    /// system prompt), and note it in the name.
    pub fn with_system(&mut self, system: &str) {
        for s in &mut self.samples {
            if let Prompt::Chat(m) = &mut s.prompt
                && !m.iter().any(|m| m.role == "system")
            {
                m.insert(0, Message::new("system", system));
            }
        }
        self.name = format!("{}+system", self.name);
    }

    /// The bare samples' requests (what wrappers and framings are put around).
    pub fn bare_requests(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter(|s| s.framing == "bare")
            .map(Sample::line)
            .collect()
    }

    /// Append `count` wrapped copies of the bare samples spread evenly over them, the templates
    /// taken in turn (framing `wrapped`), and note it in the name.
    pub fn add_wrapped(&mut self, templates: &[&str], count: usize) {
        let bare = self.bare_requests();
        if templates.is_empty() || count == 0 || bare.is_empty() {
            return;
        }
        let n = bare.len();
        let count = count.min(n);
        for i in 0..count {
            let template = templates[i % templates.len()];
            let mut sample = Sample::bare(&template.replace("{instruction}", &bare[i * n / count]));
            sample.framing = "wrapped".into();
            self.samples.push(sample);
        }
        self.name = format!("{}+wrapped{count}", self.name);
    }

    /// Name, size and sha256 (of the samples' lines, with their framings when not bare), as
    /// recorded in packs.
    pub fn describe(&self) -> CalibrationSet {
        let lines: Vec<String> = self
            .samples
            .iter()
            .map(|s| match s.framing.as_str() {
                "bare" | "wrapped" => s.line(),
                f => format!("{f}\t{}", s.line()),
            })
            .collect();
        CalibrationSet {
            name: self.name.clone(),
            size: self.samples.len(),
            sha256: hex::encode(Sha256::digest(lines.join("\n").as_bytes())),
        }
    }
}

fn parse_line(v: Line) -> anyhow::Result<Sample> {
    let (prompt, inferred) = match (v.instruction, v.messages, v.prompt) {
        (Some(i), None, None) => (Prompt::Chat(vec![Message::new("user", i)]), "bare"),
        (None, Some(m), None) => {
            if m.is_empty() {
                bail!("`messages` is empty");
            }
            let framing = if m.iter().any(|m| m.role == "system") {
                "system-prompt"
            } else if m.len() > 1 {
                "multi-turn"
            } else {
                "bare"
            };
            let m = m
                .into_iter()
                .map(|m| Message::new(m.role, m.content))
                .collect();
            (Prompt::Chat(m), framing)
        }
        (None, None, Some(p)) => (Prompt::Text(p), "raw-completion"),
        _ => bail!("expected exactly one of `instruction`, `messages` or `prompt`"),
    };
    Ok(Sample {
        prompt,
        framing: v.framing.unwrap_or_else(|| inferred.into()),
    })
}

/// `calibrate --system` and `eval --system`: the operator's system prompt, read from `path`, put
/// before every chat of both sets that has none ([`PromptSet::with_system`]).
pub fn add_system_prompt(
    path: &Path,
    harmful: &mut PromptSet,
    harmless: &mut PromptSet,
) -> anyhow::Result<()> {
    let system = std::fs::read_to_string(path)
        .with_context(|| format!("reading the system prompt {}", path.display()))?;
    harmful.with_system(system.trim());
    harmless.with_system(system.trim());
    Ok(())
}

/// Calibration's use of wrappers: every harmful prompt, and as many harmless ones, are also taken
/// wrapped, so that the wrappers themselves carry no class signal.
pub fn add_wrapped_to_both(harmful: &mut PromptSet, harmless: &mut PromptSet, templates: &[&str]) {
    let count = harmful
        .samples
        .iter()
        .filter(|s| s.framing == "bare")
        .count();
    harmful.add_wrapped(templates, count);
    harmless.add_wrapped(templates, count);
}

/// Write a set as JSONL request bodies with their framings (what [`PromptSet::load`] reads).
pub fn write_jsonl(samples: &[Sample], path: &Path) -> anyhow::Result<()> {
    let mut out = String::new();
    for s in samples {
        let mut v = match &s.prompt {
            Prompt::Chat(m) => serde_json::json!({ "messages": m }),
            Prompt::Text(t) => serde_json::json!({ "prompt": t }),
            Prompt::Tokens(ids) => serde_json::json!({ "prompt": ids }),
        };
        v["framing"] = serde_json::Value::from(s.framing.as_str());
        out.push_str(&v.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_spreads_over_the_set_and_takes_templates_in_turn() {
        let mut set = PromptSet {
            name: "builtin".into(),
            samples: (0..6).map(|i| Sample::bare(&format!("p{i}"))).collect(),
        };
        set.add_wrapped(&["A {instruction}", "{instruction} B"], 3);
        assert_eq!(set.name, "builtin+wrapped3");
        let wrapped: Vec<String> = set.samples[6..].iter().map(Sample::line).collect();
        assert_eq!(wrapped, ["A p0", "p2 B", "A p4"]);
        assert!(set.samples[6..].iter().all(|s| s.framing == "wrapped"));
        let before = set.samples.len();
        set.add_wrapped(&[], 3);
        assert_eq!(set.samples.len(), before);
    }

    #[test]
    fn jsonl_takes_requests_and_instructions_and_infers_framings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("set.jsonl");
        std::fs::write(
            &path,
            [
                r#"{"instruction": "a"}"#,
                r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}], "model": "x"}"#,
                r#"{"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}]}"#,
                r#"{"prompt": "Q: f\nA:"}"#,
                r#"{"messages": [{"role": "user", "content": "g"}], "framing": "long-context"}"#,
            ]
            .join("\n"),
        )
        .expect("write");
        let mut set = PromptSet::load(Some(&path), "").expect("loads");
        let framings: Vec<&str> = set.samples.iter().map(|s| s.framing.as_str()).collect();
        assert_eq!(
            framings,
            [
                "bare",
                "system-prompt",
                "multi-turn",
                "raw-completion",
                "long-context"
            ]
        );
        assert_eq!(set.samples[3].prompt, Prompt::Text("Q: f\nA:".into()));
        // round trip
        let again = dir.path().join("again.jsonl");
        write_jsonl(&set.samples, &again).expect("writes");
        let reread = PromptSet::load(Some(&again), "").expect("loads");
        assert_eq!(reread.samples, set.samples);
        // an operator's system prompt goes before chats without one
        set.with_system("op");
        let Prompt::Chat(m) = &set.samples[0].prompt else {
            panic!("chat")
        };
        assert_eq!(
            (m[0].role.as_str(), m[0].content.as_str()),
            ("system", "op")
        );
        let Prompt::Chat(m) = &set.samples[1].prompt else {
            panic!("chat")
        };
        assert_eq!(m[0].content, "s");
        assert_eq!(set.samples[3].prompt, Prompt::Text("Q: f\nA:".into()));

        std::fs::write(&path, r#"{"prompt": "x", "messages": []}"#).expect("write");
        let err = PromptSet::load(Some(&path), "").expect_err("refused");
        assert!(format!("{err:#}").contains("exactly one of"), "{err:#}");
    }
}
