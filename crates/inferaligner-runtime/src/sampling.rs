//! Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded, with
//! repetition (Hugging Face), frequency and presence (OpenAI) penalties and OpenAI's logit bias;
//! and the log-probabilities of the model's own distribution (OpenAI's `logprobs`).

use std::collections::HashMap;

pub use inferaligner_core::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-sequence sampling state: the parameters, the RNG and the token counts penalties need.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Occurrences of each token in the output so far.
    output_counts: HashMap<u32, u32>,
    /// Tokens of prompt and output, for the repetition penalty.
    seen: HashMap<u32, ()>,
}

impl Sampler {
    /// A sampler for one sequence with the given prompt.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            params,
            rng,
            output_counts: HashMap::new(),
            seen: prompt.iter().map(|&t| (t, ())).collect(),
        }
    }

    /// Pick the next token from `logits` (modified in place) and record it.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.apply_penalties(logits);
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.sample_stochastic(logits)
        };
        *self.output_counts.entry(token).or_default() += 1;
        self.seen.insert(token, ());
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
        for (&t, &bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
    }

    /// A token drawn from the softmax of `logits / temperature`, restricted to the `top_k` most
    /// likely tokens and then to the smallest set of them whose probability reaches `top_p`.
    ///
    /// Why not sort the vocabulary: sorting SmolLM2's 49,152 logits took 1.4–1.7 ms a token and
    /// row (a third of a decode step at batch 1, two thirds at batch 8), and every request that
    /// leaves `temperature` at the API's default of 1 samples. Only the most likely tokens are
    /// sorted: those within reach of the cut-off, found by their weight ([`head_of`]); with
    /// neither cut-off nothing is sorted and the draw walks the vocabulary in id order.
    fn sample_stochastic(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let weights = softmax_weights(logits, p.temperature);
        let draw = self.rng.random::<f64>();
        if p.top_k == 0 && p.top_p >= 1.0 {
            return draw_in_id_order(&weights, draw);
        }
        let kept = kept(logits, &weights, p.top_k, p.top_p);
        if kept.is_empty() {
            return argmax(logits); // every logit NaN
        }
        let mut draw = draw * weight_of(&kept, &weights);
        for &t in &kept {
            draw -= f64::from(weights[t as usize]);
            if draw <= 0.0 {
                return t;
            }
        }
        kept[kept.len() - 1] // rounding left a little of the draw
    }
}

/// exp((l − max) / temperature) for every logit: each at most 1 (the best token's is 1), and 0
/// for a logit more than 87 × temperature below the best one (−∞ included: a token a grammar
/// forbids is never drawn) or NaN.
fn softmax_weights(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = max_logit(logits);
    let scale = 1.0 / temperature;
    let weight = |l: f32| {
        let x = (l - max) * scale;
        let w = exp_nonpositive(x);
        if x > -87.0 { w } else { 0.0 }
    };
    // in chunks of eight into a zeroed buffer, which the compiler vectorises (a `map` and
    // `collect` over the logits did not: 43 µs for SmolLM2's vocabulary)
    let mut weights = vec![0f32; logits.len()];
    let mut chunks = weights.chunks_exact_mut(8);
    for (out, l) in (&mut chunks).zip(logits.chunks_exact(8)) {
        for (w, &l) in out.iter_mut().zip(l) {
            *w = weight(l);
        }
    }
    let done = logits.len() - chunks.into_remainder().len();
    for (w, &l) in weights[done..].iter_mut().zip(&logits[done..]) {
        *w = weight(l);
    }
    weights
}

/// The tokens top-k and then top-p keep, best first (ties: lower id first).
fn kept(logits: &[f32], weights: &[f32], top_k: usize, top_p: f32) -> Vec<u32> {
    // top-p of the probability left after top-k (all of it without top-k)
    let (mut kept, mass) = if top_k > 0 {
        let kept = head_of(logits, weights, Enough::Tokens(top_k.min(weights.len())));
        let mass = weight_of(&kept, weights);
        (kept, mass)
    } else {
        let mass = lane_sum(weights, |w| w);
        let enough = Enough::Weight(f64::from(top_p) * mass);
        (head_of(logits, weights, enough), mass)
    };
    if top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = kept
            .iter()
            .position(|&t| {
                cumulative += f64::from(weights[t as usize]) / mass;
                cumulative >= f64::from(top_p)
            })
            .map_or(kept.len(), |i| i + 1);
        kept.truncate(keep);
    }
    kept
}

/// How many of the best tokens [`head_of`] must find: a count (top-k) or a weight (top-p).
#[derive(Clone, Copy)]
enum Enough {
    Tokens(usize),
    Weight(f64),
}

/// Σ weights of `tokens`.
fn weight_of(tokens: &[u32], weights: &[f32]) -> f64 {
    tokens.iter().map(|&t| f64::from(weights[t as usize])).sum()
}

/// The best tokens, best first (ties: lower id first): `Tokens(k)`, the `k` best; `Weight(w)`,
/// a prefix of the sorted vocabulary weighing at least `w`. Found without sorting the
/// vocabulary: the tokens whose weight is at least τ are a prefix of the sorted order, so τ
/// falls (10⁻³, 10⁻⁶, …, then 0) until that prefix is long or heavy enough, and only it is
/// sorted. At temperature 1 a weight of 10⁻³ is a logit within 6.9 of the best one: tens to
/// hundreds of tokens.
fn head_of(logits: &[f32], weights: &[f32], enough: Enough) -> Vec<u32> {
    let better = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    for tau in [1e-3f32, 1e-6, 1e-12, 1e-24, 0.0] {
        let mut head: Vec<u32> = (0..weights.len() as u32)
            .filter(|&t| weights[t as usize] >= tau && (tau > 0.0 || !logits[t as usize].is_nan()))
            .collect();
        let reached = match enough {
            Enough::Tokens(k) => head.len() >= k,
            Enough::Weight(w) => weight_of(&head, weights) >= w,
        };
        if !reached && tau > 0.0 {
            continue;
        }
        match enough {
            Enough::Tokens(k) => {
                if head.len() > k {
                    head.select_nth_unstable_by(k - 1, better);
                    head.truncate(k);
                }
                head.sort_unstable_by(better);
                return head;
            }
            // sort the best 256, 1,024, … of the head until they weigh enough
            Enough::Weight(w) => {
                let mut m = head.len().min(256);
                loop {
                    if m < head.len() {
                        head.select_nth_unstable_by(m - 1, better);
                    }
                    head[..m].sort_unstable_by(better);
                    if weight_of(&head[..m], weights) >= w || m == head.len() {
                        head.truncate(m);
                        return head;
                    }
                    m = (m * 4).min(head.len());
                }
            }
        }
    }
    unreachable!("τ = 0 keeps every token")
}

/// The token at `draw` (in [0, 1)) of the cumulative weight in id order: chunk sums first, so
/// that only one chunk is walked token by token.
fn draw_in_id_order(weights: &[f32], draw: f64) -> u32 {
    const CHUNK: usize = 256;
    let sums: Vec<f64> = weights.chunks(CHUNK).map(|c| lane_sum(c, |w| w)).collect();
    let mut draw = draw * sums.iter().sum::<f64>();
    let mut last = 0;
    for (c, &chunk_sum) in sums.iter().enumerate() {
        if draw > chunk_sum {
            draw -= chunk_sum;
            continue;
        }
        for (i, &w) in weights[c * CHUNK..].iter().take(CHUNK).enumerate() {
            if w > 0.0 {
                last = c * CHUNK + i;
                draw -= f64::from(w);
                if draw <= 0.0 {
                    return last as u32;
                }
            }
        }
    }
    // rounding left a little of the draw: the last token with any weight
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(last) as u32
}

/// Log-probabilities under the softmax of `logits` (the model's own distribution: no
/// temperature, penalty, bias or grammar): the `chosen` token's, and the `top` most likely
/// tokens' (best first; ties: lower id first).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = max_logit(logits);
    let norm = max + lane_sum(logits, |l| exp_nonpositive(l - max)).ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == top && l <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    let chosen = logits
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - norm);
    (
        chosen,
        best.into_iter().map(|(t, l)| (t, l - norm)).collect(),
    )
}

/// Σ term(v) over `values` (each term an f32), in eight independent f64 lanes, so that the
/// compiler can vectorise it: with [`exp_nonpositive`] as the term, libm's `expf` one value at
/// a time took 0.3 ms for SmolLM2's 49,152 logits, a token and row of every request that asks
/// for log-probabilities.
fn lane_sum(values: &[f32], term: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = (chunks.remainder().iter())
        .map(|&v| f64::from(term(v)))
        .sum();
    for chunk in chunks {
        let mut terms = [0f32; 8];
        for (t, &v) in terms.iter_mut().zip(chunk) {
            *t = term(v);
        }
        for (lane, t) in lanes.iter_mut().zip(terms) {
            *lane += f64::from(t);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// e^x for x ≤ 0 (at most e^−87 below −87, −∞ and NaN included): 2^n × e^r with n the
/// integer nearest x·log2(e) and r = x − n·ln 2 (in two parts, so that r keeps f32's precision)
/// in [−ln 2 / 2, ln 2 / 2], e^r from its Taylor series to degree 6 (relative error about
/// 1e-7), 2^n written into the exponent bits. Only operations that vectorise (no libm call).
#[expect(
    clippy::manual_clamp,
    reason = "clamp keeps NaN; max and min take it to −87"
)]
fn exp_nonpositive(x: f32) -> f32 {
    // without a branch: below −87 (and −∞, NaN) as e^−87, under f32's smallest normal number
    let x = x.max(-87.0).min(0.0);
    // n = x·log2(e) rounded to nearest by adding 1.5 × 2^23 (the sum's low mantissa bits are
    // n, in two's complement): no float-to-int conversion, which does not vectorise
    const ROUND: f32 = 12_582_912.0;
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // 2^n: n + 127 in the exponent bits
    let bits = k.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(bits)
}

/// Index of the largest logit (the lowest index among equals); NaN never wins (all NaN: 0).
///
/// In two passes that vectorise (the largest value, then where it first occurs) rather than
/// one that carries the best index from logit to logit: 135 µs for SmolLM2's 49,152 logits
/// otherwise, a token and row of every greedy request (5 % of a decode step at batch 8).
pub fn argmax(logits: &[f32]) -> u32 {
    const CHUNK: usize = 64;
    let max = max_logit(logits);
    for (c, chunk) in logits.chunks(CHUNK).enumerate() {
        if chunk.iter().fold(false, |hit, &v| hit | (v == max))
            && let Some(i) = chunk.iter().position(|&v| v == max)
        {
            return (c * CHUNK + i) as u32;
        }
    }
    0
}

/// The largest logit, NaN ignored (−∞ when there is no other), in sixteen lanes: `v > m` is
/// false for NaN, and the compiler turns it into vector max instructions.
fn max_logit(logits: &[f32]) -> f32 {
    let larger = |m: f32, v: f32| if v > m { v } else { m };
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = logits.chunks_exact(16);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    lanes.into_iter().fold(rest, larger)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, -1.0, 1.9, 0.5, 3.5, -0.2, 1.0]
    }

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_is_argmax_and_ties_take_the_lower_id() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&mut logits()), 5);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy_for_any_seed() {
        for seed in 0..50 {
            let mut k1 = Sampler::new(params(1.5, 1, 1.0, seed), &[]);
            let mut p0 = Sampler::new(params(1.5, 0, 1e-6, seed), &[]);
            assert_eq!(k1.sample(&mut logits()), 5);
            assert_eq!(p0.sample(&mut logits()), 5);
        }
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        for seed in 0..200 {
            let mut s = Sampler::new(params(2.0, 3, 1.0, seed), &[]);
            assert!([5, 1, 3].contains(&s.sample(&mut logits())));
        }
    }

    #[test]
    fn same_seed_same_tokens_and_temperature_spreads_choices() {
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed), &[]);
            (0..64).map(|_| s.sample(&mut logits())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let distinct: std::collections::HashSet<_> = run(7).into_iter().collect();
        assert!(distinct.len() > 2, "temperature 1 should not be greedy");
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let l = vec![0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(params(1.0, 0, 1.0, 42), &[]);
        let n = 4000;
        let ones = (0..n).filter(|_| s.sample(&mut l.clone()) == 1).count();
        let share = ones as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.03, "share {share}");
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 2.0,
                ..SamplingParams::default()
            },
            &[],
        );
        let first = s.sample(&mut logits());
        let second = s.sample(&mut logits());
        // 3.5 - 2.0 = 1.5 falls below token 1's 2.0 once token 5 has been produced
        assert_eq!((first, second), (5, 1));
    }

    #[test]
    fn repetition_penalty_applies_to_prompt_tokens() {
        let p = SamplingParams {
            repetition_penalty: 4.0,
            ..SamplingParams::default()
        };
        // token 5 (3.5) is in the prompt: 3.5 / 4 < 2.0, so token 1 wins
        assert_eq!(Sampler::new(p, &[5]).sample(&mut logits()), 1);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens() {
        let biased = |bias: &[(u32, f32)]| SamplingParams {
            logit_bias: bias.iter().copied().collect(),
            ..SamplingParams::default()
        };
        // banning the best token leaves the second; a bias of +100 wins over any logit here
        assert_eq!(
            Sampler::new(biased(&[(5, -100.0)]), &[]).sample(&mut logits()),
            1
        );
        assert_eq!(
            Sampler::new(biased(&[(2, 100.0)]), &[]).sample(&mut logits()),
            2
        );
        // ids past the vocabulary change nothing
        assert_eq!(
            Sampler::new(biased(&[(99, 100.0)]), &[]).sample(&mut logits()),
            5
        );
        assert!(biased(&[(1, 101.0)]).validate().is_err());
    }

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_is_sorted() {
        let l = logits();
        let total: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        let (chosen, top) = logprobs(&l, 3, 3);
        assert!(
            (f64::from(chosen) - (1.9 - total.ln())).abs() < 1e-5,
            "{chosen}"
        );
        let ids: Vec<u32> = top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, [5, 1, 3]);
        for &(t, lp) in &top {
            let want = f64::from(l[t as usize]) - total.ln();
            assert!((f64::from(lp) - want).abs() < 1e-5, "{t}: {lp} vs {want}");
        }
        // every probability, top asked past the vocabulary: sums to one
        let (_, all) = logprobs(&l, 0, 100);
        assert_eq!(all.len(), l.len());
        let p: f64 = all.iter().map(|&(_, lp)| f64::from(lp).exp()).sum();
        assert!((p - 1.0).abs() < 1e-5, "{p}");
        // ties: the lower id first; a banned (−inf) token has −inf
        let (banned, top) = logprobs(&[1.0, 1.0, f32::NEG_INFINITY], 2, 2);
        assert_eq!((top[0].0, top[1].0), (0, 1));
        assert_eq!(banned, f32::NEG_INFINITY);
        assert!(logprobs(&l, 0, 0).1.is_empty());
    }

    #[test]
    fn the_vectorised_exponential_is_libms_to_a_part_in_a_million() {
        for i in 0..=200_000 {
            let x = -(i as f32) * 0.000_5; // 0 to −100
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            if exact > f32::MIN_POSITIVE * 4.0 {
                assert!(
                    ((fast - exact) / exact).abs() < 1e-6,
                    "{x}: {fast} vs {exact}"
                );
            } else {
                assert!(fast <= f32::MIN_POSITIVE * 4.0, "{x}: {fast}");
            }
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        assert!(exp_nonpositive(f32::NAN) < 1e-37);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    /// The sampler before it stopped sorting the vocabulary: every token sorted best first,
    /// cut to top-k, then to top-p. What it may keep is what the sampler may return.
    fn kept_by_sorting(logits: &[f32], top_k: usize, top_p: f32, temperature: f32) -> Vec<u32> {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        if top_k > 0 {
            order.truncate(top_k);
        }
        let max = logits[order[0] as usize];
        let probs: Vec<f64> = (order.iter())
            .map(|&t| f64::from((logits[t as usize] - max) / temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|&x| {
                cumulative += x / total;
                cumulative >= f64::from(top_p)
            })
            .map_or(order.len(), |i| i + 1);
        if top_p < 1.0 {
            order.truncate(keep);
        }
        order
    }

    #[test]
    fn a_large_vocabulary_keeps_what_sorting_it_keeps() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for case in 0..40 {
            // peaked (a model's next token) or flat (temperature 2 over near-equal logits)
            let spread = [20.0, 2.0, 0.01][case % 3];
            let logits: Vec<f32> = (0..5_000).map(|_| rng.random::<f32>() * spread).collect();
            let (temperature, top_k, top_p) = (
                [0.3, 1.0, 2.0][case % 3],
                [0, 1, 40, 4_999][case % 4],
                [1.0, 0.9, 0.5][case % 3],
            );
            let want = kept_by_sorting(&logits, top_k, top_p, temperature);
            let allowed: std::collections::HashSet<u32> = want.iter().copied().collect();
            let mut s = Sampler::new(params(temperature, top_k, top_p, case as u64), &[]);
            for _ in 0..50 {
                let t = s.sample(&mut logits.clone());
                assert!(
                    allowed.contains(&t),
                    "case {case}: {t} not among {} kept",
                    want.len()
                );
            }
            // the same tokens, but for the last one where the cumulative sum's rounding decides
            let got = kept(
                &logits,
                &softmax_weights(&logits, temperature),
                top_k,
                top_p,
            );
            let same = got.len().min(want.len());
            assert!(
                got.len().abs_diff(want.len()) <= 1 && got[..same] == want[..same],
                "case {case}: kept {} against {}",
                got.len(),
                want.len()
            );
        }
    }

    #[test]
    fn every_token_is_drawn_as_often_as_its_probability() {
        // 600 tokens (three chunks of the id-order draw), probabilities from 1e-4 to 0.2
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let l: Vec<f32> = (0..600).map(|_| rng.random::<f32>() * 8.0).collect();
        let total: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 5), &[]);
        let n = 40_000;
        let mut counts = vec![0usize; l.len()];
        for _ in 0..n {
            counts[s.sample(&mut l.clone()) as usize] += 1;
        }
        for (t, &c) in counts.iter().enumerate() {
            let p = f64::from(l[t]).exp() / total;
            let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
            assert!(
                (c as f64 - mean).abs() <= 5.0 * sd + 1.0,
                "token {t}: {c} draws, {mean:.1} expected"
            );
        }
    }

    #[test]
    fn top_p_frequencies_follow_the_kept_softmax() {
        // probabilities ∝ 4, 3, 2, 1 (+ a tail of 1,000 tokens sharing 1): top-p 0.8 keeps
        // the first three (cumulative 0.4, 0.7, 0.9), drawn 4 : 3 : 2
        let mut l = vec![4f32.ln(), 3f32.ln(), 2f32.ln(), 0.0];
        l.extend(std::iter::repeat_n(-(1_000f32.ln()), 1_000));
        let mut s = Sampler::new(params(1.0, 0, 0.8, 9), &[]);
        let mut counts = [0usize; 3];
        for _ in 0..9_000 {
            counts[s.sample(&mut l.clone()) as usize] += 1; // a token past 2 panics here
        }
        for (t, want) in [4.0 / 9.0, 3.0 / 9.0, 2.0 / 9.0].into_iter().enumerate() {
            let share = counts[t] as f64 / 9_000.0;
            assert!((share - want).abs() < 0.02, "token {t}: {share} vs {want}");
        }
    }

    #[test]
    fn forbidden_and_nan_logits_are_never_drawn() {
        let mut l = vec![f32::NEG_INFINITY; 300];
        l[7] = 0.0;
        l[200] = 0.5;
        l[3] = f32::NAN;
        for (top_k, top_p) in [(0, 1.0), (0, 0.99), (50, 1.0), (400, 0.999)] {
            let mut s = Sampler::new(params(2.0, top_k, top_p, 1), &[]);
            for _ in 0..200 {
                assert!(
                    [7, 200].contains(&s.sample(&mut l.clone())),
                    "{top_k} {top_p}"
                );
            }
        }
        let mut s = Sampler::new(params(1.0, 5, 0.9, 1), &[]);
        assert_eq!(s.sample(&mut [f32::NAN; 4]), 0);
    }

    proptest::proptest! {
        #[test]
        fn argmax_is_the_first_largest_non_nan_logit(
            logits in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => (-4i8..4).prop_map(f32::from),
                    1 => proptest::strategy::Just(f32::NAN),
                    1 => proptest::strategy::Just(f32::NEG_INFINITY),
                    1 => proptest::strategy::Just(f32::INFINITY),
                ],
                1..300,
            )
        ) {
            let want = logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan())
                .fold(None, |best: Option<(usize, f32)>, (i, &v)| match best {
                    Some((_, b)) if b >= v => best,
                    _ => Some((i, v)),
                })
                .map_or(0, |(i, _)| i as u32);
            proptest::prop_assert_eq!(argmax(&logits), want);
        }
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        for bad in [
            params(-1.0, 0, 1.0, 0),
            params(3.0, 0, 1.0, 0),
            params(1.0, 0, 0.0, 0),
            params(1.0, 0, 1.5, 0),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
