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

    /// Name, size and sha256, as recorded in packs.
    pub fn describe(&self) -> CalibrationSet {
        CalibrationSet {
            name: self.name.clone(),
            size: self.prompts.len(),
            sha256: hex::encode(Sha256::digest(self.prompts.join("\n").as_bytes())),
        }
    }
}
