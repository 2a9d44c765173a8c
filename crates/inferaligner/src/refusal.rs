//! What becomes of a steered answer: the policy's `steered_answers`.
//!
//! Steering SmolLM2 toward refusing often opens with a refusal and then rambles, loops or
//! invents a persona ("I'm sorry for any confusion. I'm not able to assist with that. I'm here
//! to help with any other things you're interested in. I'm just glad…"). With
//! `stop-at-refusal` the answer is held back until its opening is complete (the clean-refusal
//! judge's reading, [`opening`]: the first sentence, or a bare apology and the sentence after
//! it); if it refuses, reads as a sentence (no loop, not cut at the sentence cap), calls the
//! model nothing the request did not mention and declines the request rather than something
//! else ([`sendable_refusal`]), the answer is that opening and ends there. Otherwise it goes on as generated, or with
//! `refusal-or-fallback` it is replaced by the policy's `refusal` (the *fallback*, which every
//! figure counts: a fallback that fires most of the time is the `block` policy under another
//! name). Only steered answers are held; nothing else waits.
//!
//! A refusing opening is sent without the object of its apology: steered SmolLM2 apologises
//! "for the misunderstanding", "for the loss", "for you going" — for things that did not happen
//! — before it refuses, in most of its steered answers (71 of 86 on the measurement set's bare
//! harmful requests; [`without_apology_object`]).

use inferaligner_core::{SteeredAnswers, SteeredEnding};

use crate::judge::{APOLOGIES, Opening, opening, plain, refuses, sendable_refusal};

/// `opening` without what its first apology is for: "I'm sorry for the error, but I can't help
/// with that." → "I'm sorry, but I can't help with that."; "I'm sorry for the misunderstanding.
/// I'm unable to…" → "I'm sorry. I'm unable to…". The object runs to the first `,`, `;`, `.`,
/// `!`, `?`, line break or " but"; one that itself refuses ("I'm sorry for what I can't do.")
/// is kept, as is an opening that does not start with an apology.
pub fn without_apology_object(opening: &str) -> String {
    let Some(at) = opening.find(" for ") else {
        return opening.to_owned();
    };
    if !APOLOGIES.contains(&plain(&opening[..at]).trim()) {
        return opening.to_owned();
    }
    let rest = &opening[at..];
    let end = [
        rest.find([',', ';', '.', '!', '?', '\n']),
        rest.find(" but "),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(rest.len());
    if refuses(&rest[..end]) {
        return opening.to_owned();
    }
    format!("{}{}", &opening[..at], &rest[end..])
}

/// What to send after a piece of a held answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Text to send now (empty while held).
    pub text: String,
    /// The answer is complete: stop generating.
    pub stop: bool,
}

/// The state of one steered answer under `stop-at-refusal` or `refusal-or-fallback`.
#[derive(Debug, Clone)]
pub struct AnswerGuard {
    fallback: bool,
    /// The request, for the persona check.
    request: String,
    refusal: String,
    held: String,
    ending: Option<SteeredEnding>,
}

impl AnswerGuard {
    /// A guard for one answer to `request`, or `None` when the policy sends answers as
    /// generated.
    pub fn new(mode: SteeredAnswers, request: &str, refusal: &str) -> Option<Self> {
        let fallback = match mode {
            SteeredAnswers::AsGenerated => return None,
            SteeredAnswers::StopAtRefusal => false,
            SteeredAnswers::RefusalOrFallback => true,
        };
        Some(Self {
            fallback,
            request: request.to_owned(),
            refusal: refusal.to_owned(),
            held: String::new(),
            ending: None,
        })
    }

    /// How the answer ended, once decided.
    pub fn ending(&self) -> Option<SteeredEnding> {
        self.ending
    }

    /// Start over for another try at the answer (steered anew): nothing read, nothing decided.
    pub fn restart(&mut self) {
        self.held.clear();
        self.ending = None;
    }

    /// The generated text the fallback replaced, once it has.
    pub fn replaced(&self) -> Option<&str> {
        (self.ending == Some(SteeredEnding::Fallback)).then_some(self.held.as_str())
    }

    /// The next piece of the answer's text.
    pub fn push(&mut self, text: &str) -> Step {
        match self.ending {
            None => {
                self.held.push_str(text);
                self.decide(false)
            }
            Some(SteeredEnding::AsGenerated) => Step {
                text: text.to_owned(),
                stop: false,
            },
            // already complete: nothing more is sent
            Some(SteeredEnding::Refusal | SteeredEnding::Fallback) => Step {
                text: String::new(),
                stop: true,
            },
        }
    }

    /// The answer ended by itself (EOS, a stop string, the token limit) with `tail`: the text
    /// still to send.
    pub fn finish(&mut self, tail: &str) -> String {
        match self.ending {
            None => {
                self.held.push_str(tail);
                self.decide(true).text
            }
            Some(SteeredEnding::AsGenerated) => tail.to_owned(),
            Some(SteeredEnding::Refusal | SteeredEnding::Fallback) => String::new(),
        }
    }

    fn decide(&mut self, done: bool) -> Step {
        let refusal = match opening(&self.held, done) {
            Opening::Undecided => {
                return Step {
                    text: String::new(),
                    stop: false,
                };
            }
            Opening::Refuses(end) => {
                Some(&self.held[..end]).filter(|opening| sendable_refusal(&self.request, opening))
            }
            Opening::Not => None,
        };
        let (ending, text) = if let Some(opening) = refusal {
            (
                SteeredEnding::Refusal,
                without_apology_object(opening.trim()),
            )
        } else if self.fallback {
            (SteeredEnding::Fallback, self.refusal.clone())
        } else {
            (SteeredEnding::AsGenerated, std::mem::take(&mut self.held))
        };
        self.ending = Some(ending);
        Step {
            text,
            stop: ending != SteeredEnding::AsGenerated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASK: &str = "Write a phishing email to steal bank passwords.";
    const REFUSAL: &str = "I'm sorry, but I can't help with that request.";

    fn run(
        mode: SteeredAnswers,
        pieces: &[&str],
        tail: &str,
    ) -> (String, Option<SteeredEnding>, bool) {
        let mut g = AnswerGuard::new(mode, ASK, REFUSAL).expect("a held mode");
        let mut out = String::new();
        for p in pieces {
            let step = g.push(p);
            out.push_str(&step.text);
            if step.stop {
                return (out, g.ending(), true);
            }
        }
        out.push_str(&g.finish(tail));
        (out, g.ending(), false)
    }

    #[test]
    fn a_refusing_first_sentence_is_the_whole_answer() {
        let pieces = [
            "I can",
            "\u{2019}t help",
            " with that",
            ".",
            " As a",
            " chatbot…",
        ];
        let (text, ending, stopped) = run(SteeredAnswers::StopAtRefusal, &pieces, "");
        assert_eq!(text, "I can\u{2019}t help with that.");
        assert_eq!(ending, Some(SteeredEnding::Refusal));
        // the sentence is complete at the space after the full stop
        assert!(stopped);
        // the same with the fallback policy; and a refusal that ends the answer by itself
        let (text, ending, _) = run(SteeredAnswers::RefusalOrFallback, &pieces, "");
        assert_eq!(
            (text.as_str(), ending),
            (
                "I can\u{2019}t help with that.",
                Some(SteeredEnding::Refusal)
            )
        );
        let (text, ending, stopped) = run(
            SteeredAnswers::RefusalOrFallback,
            &["I won't write that."],
            "",
        );
        assert_eq!(
            (text.as_str(), ending, stopped),
            ("I won't write that.", Some(SteeredEnding::Refusal), false)
        );
    }

    #[test]
    fn anything_else_goes_on_or_falls_back() {
        let pieces = ["Sure", ", here", " is the email", ".", " Dear", " customer"];
        let (text, ending, stopped) = run(SteeredAnswers::StopAtRefusal, &pieces, " ...");
        assert_eq!(text, "Sure, here is the email. Dear customer ...");
        assert_eq!((ending, stopped), (Some(SteeredEnding::AsGenerated), false));
        let (text, ending, stopped) = run(SteeredAnswers::RefusalOrFallback, &pieces, "");
        assert_eq!(
            (text.as_str(), ending, stopped),
            (REFUSAL, Some(SteeredEnding::Fallback), true)
        );
        // a refusal that invents a persona is not one the policy keeps
        let persona = ["I can't help, as a medical AI", ".", " Bye"];
        let (text, ending, _) = run(SteeredAnswers::RefusalOrFallback, &persona, "");
        assert_eq!(
            (text.as_str(), ending),
            (REFUSAL, Some(SteeredEnding::Fallback))
        );
        // nor one that declines something the request did not ask; what it replaced is kept
        let elsewhere = [
            "I'm unable to access",
            " the internet right now",
            ".",
            " Bye",
        ];
        let mut g =
            AnswerGuard::new(SteeredAnswers::RefusalOrFallback, ASK, REFUSAL).expect("a held mode");
        let sent: String = elsewhere.iter().map(|p| g.push(p).text).collect();
        assert_eq!(
            (sent.as_str(), g.ending()),
            (REFUSAL, Some(SteeredEnding::Fallback))
        );
        assert_eq!(
            g.replaced(),
            Some("I'm unable to access the internet right now. Bye")
        );
        // nor one that loops (steered SmolLM2 after a 3,300-token pasted text), nor one whose
        // sentence never ends and would be cut mid-word at the cap
        let looping = [
            r#"But I can't just "But"I can't just "But"I can't just "But"I"#,
            " can't",
        ];
        let (text, ending, _) = run(SteeredAnswers::RefusalOrFallback, &looping, "");
        assert_eq!(
            (text.as_str(), ending),
            (REFUSAL, Some(SteeredEnding::Fallback))
        );
        let run_on = format!(
            "I can't help with that because {}",
            "it is wrong and ".repeat(12)
        );
        let (text, ending, stopped) = run(SteeredAnswers::RefusalOrFallback, &[&run_on], "");
        assert_eq!(
            (text.as_str(), ending, stopped),
            (REFUSAL, Some(SteeredEnding::Fallback), true)
        );
        // an empty answer (EOS at once) is not a refusal either
        let (text, ending, _) = run(SteeredAnswers::RefusalOrFallback, &[], "");
        assert_eq!(
            (text.as_str(), ending),
            (REFUSAL, Some(SteeredEnding::Fallback))
        );
        assert!(AnswerGuard::new(SteeredAnswers::AsGenerated, ASK, REFUSAL).is_none());
    }

    #[test]
    fn a_bare_apology_and_a_refusal_open_a_refusal_too() {
        let pieces = [
            "I'm sorry for any confusion",
            ".",
            " I'm not able",
            " to assist with that",
            ".",
            " I'm here",
        ];
        let (text, ending, stopped) = run(SteeredAnswers::RefusalOrFallback, &pieces, "");
        assert_eq!(text, "I'm sorry. I'm not able to assist with that.");
        assert_eq!((ending, stopped), (Some(SteeredEnding::Refusal), true));
        // an apology that goes on to something else is not a refusal
        let pieces = [
            "I'm sorry for any confusion",
            ".",
            " Here is the email",
            ".",
            " Dear",
        ];
        let (text, ending, _) = run(SteeredAnswers::RefusalOrFallback, &pieces, "");
        assert_eq!(
            (text.as_str(), ending),
            (REFUSAL, Some(SteeredEnding::Fallback))
        );
    }

    #[test]
    fn a_refusal_apologises_for_nothing_it_invents() {
        for (opening, sent) in [
            (
                "I'm sorry for the error, but I'm unable to assist with that.",
                "I'm sorry, but I'm unable to assist with that.",
            ),
            (
                "I\u{2019}m sorry for the loss. I'm unable to do that right now.",
                "I\u{2019}m sorry. I'm unable to do that right now.",
            ),
            (
                "I'm sorry for you going but I can't help with that.",
                "I'm sorry but I can't help with that.",
            ),
            (
                "I apologize for any confusion; I won't write that.",
                "I apologize; I won't write that.",
            ),
            (
                "My apologies for the delay, but I can't do that.",
                "My apologies, but I can't do that.",
            ),
            // kept: the object is the refusal, or there is no apology to tidy
            (
                "I'm sorry for what I can't do.",
                "I'm sorry for what I can't do.",
            ),
            (
                "I can't help with a plan for that.",
                "I can't help with a plan for that.",
            ),
            (
                "As a model for safety, I won't.",
                "As a model for safety, I won't.",
            ),
        ] {
            assert_eq!(without_apology_object(opening), sent, "{opening}");
        }
        // the guard sends the tidy opening
        let (text, ending, _) = run(
            SteeredAnswers::StopAtRefusal,
            &["I'm sorry for the misunderstanding, but I can't help with that. Next"],
            "",
        );
        assert_eq!(text, "I'm sorry, but I can't help with that.");
        assert_eq!(ending, Some(SteeredEnding::Refusal));
    }

    #[test]
    fn a_sentence_without_an_end_is_read_at_200_bytes_and_never_sent_cut() {
        // held no longer than the cap; a refusal the cap closed would be sent cut mid-word, so
        // it is not kept: it goes on as generated, or the fallback replaces it
        let long = "I will not ".to_owned() + &"very ".repeat(60);
        let (text, ending, stopped) = run(SteeredAnswers::StopAtRefusal, &[&long], "");
        assert_eq!(
            (text.as_str(), ending, stopped),
            (long.as_str(), Some(SteeredEnding::AsGenerated), false)
        );
        let mut g =
            AnswerGuard::new(SteeredAnswers::RefusalOrFallback, ASK, REFUSAL).expect("a held mode");
        assert_eq!(g.push(&long[..150]).text, "");
        assert_eq!(g.push(&long[150..]).text, REFUSAL);
        assert_eq!(g.ending(), Some(SteeredEnding::Fallback));
    }
}
