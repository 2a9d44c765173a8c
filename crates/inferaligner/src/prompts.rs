//! Prompt sets: built in, JSONL with `instruction`, or plain text lines.

use std::path::Path;

use anyhow::{Context, bail};
use inferaligner_core::CalibrationSet;
use sha2::{Digest, Sha256};

use crate::calibration_prompts;

/// A named prompt set.
pub struct PromptSet {
    /// File name, or `builtin`.
    pub name: String,
    /// The prompts, in file order.
    pub prompts: Vec<String>,
}

impl PromptSet {
    /// Read JSONL (an `instruction` per line) or plain lines; `None` takes `builtin`.
    pub fn load(path: Option<&Path>, builtin: &str) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self {
                name: "builtin".into(),
                prompts: calibration_prompts::lines(builtin)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            });
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading prompts from {}", path.display()))?;
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let mut prompts = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            if jsonl {
                let v: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
                let Some(instruction) = v.get("instruction").and_then(|s| s.as_str()) else {
                    bail!("{}:{}: no \"instruction\" string", path.display(), i + 1);
                };
                prompts.push(instruction.to_owned());
            } else {
                prompts.push(line.trim().to_owned());
            }
        }
        if prompts.is_empty() {
            bail!("{}: no prompts", path.display());
        }
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        Ok(Self { name, prompts })
    }

    /// Append `count` wrapped copies of prompts spread evenly over the set, the templates taken
    /// in turn, and note it in the name (so packs record what they were calibrated on).
    pub fn add_wrapped(&mut self, templates: &[&str], count: usize) {
        if templates.is_empty() || count == 0 || self.prompts.is_empty() {
            return;
        }
        let n = self.prompts.len();
        let count = count.min(n);
        let wrapped: Vec<String> = (0..count)
            .map(|i| {
                let template = templates[i % templates.len()];
                template.replace("{instruction}", &self.prompts[i * n / count])
            })
            .collect();
        self.prompts.extend(wrapped);
        self.name = format!("{}+wrapped{count}", self.name);
    }

    /// Name, size and sha256, as recorded in packs.
    pub fn describe(&self) -> CalibrationSet {
        CalibrationSet {
            name: self.name.clone(),
            size: self.prompts.len(),
            sha256: hex::encode(Sha256::digest(self.prompts.join("\n").as_bytes())),
        }
    }
}

/// Calibration's use of wrappers: every harmful prompt, and as many harmless ones, are also taken
/// wrapped, so that the wrappers themselves carry no class signal.
pub fn add_wrapped_to_both(harmful: &mut PromptSet, harmless: &mut PromptSet, templates: &[&str]) {
    let count = harmful.prompts.len();
    harmful.add_wrapped(templates, count);
    harmless.add_wrapped(templates, count);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_spreads_over_the_set_and_takes_templates_in_turn() {
        let mut set = PromptSet {
            name: "builtin".into(),
            prompts: (0..6).map(|i| format!("p{i}")).collect(),
        };
        set.add_wrapped(&["A {instruction}", "{instruction} B"], 3);
        assert_eq!(set.name, "builtin+wrapped3");
        assert_eq!(
            set.prompts[6..],
            ["A p0".to_owned(), "p2 B".to_owned(), "A p4".to_owned()]
        );
        let before = set.prompts.len();
        set.add_wrapped(&[], 3);
        assert_eq!(set.prompts.len(), before);
    }
}
