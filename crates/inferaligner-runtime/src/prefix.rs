//! The prefix cache: KV of prompt prefixes shared across requests (a domain bot's system prompt,
//! few-shot examples, the earlier turns of a chat), computed once and reused by later prefills.
//!
//! A prompt is cut into blocks of [`PREFIX_BLOCK_TOKENS`]; a block is keyed by the hash of its
//! tokens chained with its parent block's key, so a key names the whole prefix up to the block
//! (as vLLM's automatic prefix caching does). A block also keeps its own tokens and its parent's
//! key, checked on every hit. A prefill reuses the longest run of cached blocks that leaves it at
//! least one token to run (the gate and the logits need a last position).
//!
//! Steering adds vectors to the residual stream after some layers, which changes the K/V of every
//! later layer at every position, so steered KV never mixes with unsteered KV: every chain has a
//! *namespace*, [`UNSTEERED`] or the steering's own key ([`crate::LayerHook::prompt_key`]: rows
//! steered alike share one), which seeds its first block's key and is checked as that block's
//! parent. A domain bot's system prompt is then computed once unsteered (for the gate and the
//! harmless requests) and once per steering strength (for the harmful ones and their retries).
//!
//! A block stored by a prefill that scored its prompt (OpenAI's `echo` with `logprobs`) also
//! keeps the head's input at each of its positions (the residual after the last layer,
//! `hidden` values against the KV's `2 × layers × kv_heads × head_dim`: +5 % on SmolLM2), so a
//! later scored prompt with that prefix (an evaluation's few-shot examples, each question's
//! options) reads the prefix's scores through the head instead of computing the prefix again.
//! A scored prompt reuses only such blocks; any prompt reuses them for their KV.
//!
//! A steered prefill also leaves its *unsteered* part for prompts steered otherwise (a retry at
//! another strength, the same document under another policy): the KV of the layers up to the
//! first steered one and the residual after that layer, before the hook ([`Block::resume`]),
//! stored as unsteered blocks. A steered prefill that finds more of its prompt so than in its
//! own namespace loads that KV and runs only the layers after it, from those residuals (13 of
//! SmolLM2's 30 layers spared when steering starts at layer 12). Unsteered prefills keep the
//! residual at the layer steering last started at with their own blocks, for the same use.
//!
//! A block holds the KV of its first `depth` layers: a gate phase that stopped after layer `k`
//! stores blocks of depth `k + 1` (enough for the next gate phase), a full prefill stores every
//! layer and upgrades them. Memory is bounded by a block count.
//!
//! Eviction is a segmented LRU, as in many caches where one-off entries are common: most prompts
//! end in tokens no other request shares (a question, a pasted document, a steered retry at a
//! strength no one else uses), and a plain LRU lets one long such prompt push out a system
//! prompt that every request reuses. So a block starts *on probation*; a later lookup that
//! reuses it makes it *protected*. The least recently used block on probation goes first, a
//! protected one only when none is left; protected blocks hold at most
//! [`PROTECTED_SHARE`] of the capacity (past it the least recently used goes back on
//! probation), so a new shared prefix always has room to prove itself. An insert copies at
//! most the room protected blocks leave. A lookup or insert stamps a chain's blocks from the
//! deepest to the first, so a block is always at least as recent as its descendants, a chain's
//! protected blocks are its first ones, and eviction never strands a block.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

use ndarray::{Array2, Array4, ArrayView2, Axis, s};

use crate::kv::KvCache;

/// Tokens per block. Small blocks reuse more of a prefix that ends mid-block (a system prompt
/// followed by varied questions reuses all but < 16 of its tokens); the bookkeeping per block
/// is a hash and a few small copies.
pub const PREFIX_BLOCK_TOKENS: usize = 16;

const B: usize = PREFIX_BLOCK_TOKENS;

/// The share of the capacity protected (reused) blocks may hold, as a fraction `(num, den)`.
pub const PROTECTED_SHARE: (usize, usize) = (3, 4);

/// The namespace of unsteered KV (a steered row's is its hook's
/// [`crate::LayerHook::prompt_key`]).
pub const UNSTEERED: u64 = 0;

struct Block {
    parent: u64,
    tokens: [u32; B],
    /// Layers held, from layer 0.
    depth: usize,
    /// `[depth, kv_heads, B, head_dim]`.
    keys: Array4<f32>,
    values: Array4<f32>,
    /// `[B, hidden]`: the head's input at each position, when a scored prefill stored the block
    /// (then `depth` is every layer).
    head_inputs: Option<Array2<f32>>,
    /// `(layer, [B, hidden])`: the residual after `layer` at each position, before any hook,
    /// where a steered prefill may resume (then `depth > layer`).
    resume: Option<(usize, Array2<f32>)>,
    last_used: u64,
    /// A later lookup reused it (protected from eviction while blocks on probation remain).
    protected: bool,
}

impl Block {
    fn bytes(&self) -> usize {
        let head_inputs = self.head_inputs.as_ref().map_or(0, Array2::len);
        let resume = self.resume.as_ref().map_or(0, |(_, r)| r.len());
        (self.keys.len() + self.values.len() + head_inputs + resume) * std::mem::size_of::<f32>()
    }
}

/// What a lookup needs a block to keep beside the KV of its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Kv,
    /// The head's inputs (a scored prompt).
    HeadInputs,
    /// The residual after this layer (a steered prefill resuming there).
    ResumeAfter(usize),
}

impl Needs {
    fn met_by(self, b: &Block) -> bool {
        match self {
            Needs::Kv => true,
            Needs::HeadInputs => b.head_inputs.is_some(),
            Needs::ResumeAfter(layer) => b.resume.as_ref().is_some_and(|(l, _)| *l == layer),
        }
    }
}

/// Residuals a store keeps beside the KV, `[tokens, hidden]`.
enum Keeps<'a> {
    Kv,
    HeadInputs(ArrayView2<'a, f32>),
    ResumeAfter(usize, ArrayView2<'a, f32>),
}

impl Keeps<'_> {
    fn needs(&self) -> Needs {
        match self {
            Keeps::Kv => Needs::Kv,
            Keeps::HeadInputs(_) => Needs::HeadInputs,
            Keeps::ResumeAfter(layer, _) => Needs::ResumeAfter(*layer),
        }
    }

    fn rows(&self) -> Option<usize> {
        match self {
            Keeps::Kv => None,
            Keeps::HeadInputs(r) | Keeps::ResumeAfter(_, r) => Some(r.nrows()),
        }
    }
}

/// Counters since the engine started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prefill phases that consulted the cache.
    pub lookups: u64,
    /// Lookups that reused at least one block.
    pub hits: u64,
    /// Prompt tokens the lookups covered.
    pub lookup_tokens: u64,
    /// Prompt tokens whose KV was reused instead of computed.
    pub reused_tokens: u64,
}

/// Cached prefix blocks, keyed by token ids. Owned by one engine thread (no locking).
pub struct PrefixCache {
    blocks: HashMap<u64, Block>,
    capacity_blocks: usize,
    /// Keys are seeded per process, so a client cannot craft colliding prompts.
    hasher: RandomState,
    clock: u64,
    stats: PrefixStats,
    /// Bytes of K/V the blocks hold.
    bytes: usize,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("blocks", &self.blocks.len())
            .field("capacity_blocks", &self.capacity_blocks)
            .field("stats", &self.stats)
            .finish()
    }
}

impl PrefixCache {
    /// A cache holding at most `max_tokens` tokens (whole blocks); `None` when that is less
    /// than one block (the cache is off).
    pub fn new(max_tokens: usize) -> Option<Self> {
        let capacity_blocks = max_tokens / B;
        (capacity_blocks > 0).then(|| Self {
            blocks: HashMap::new(),
            capacity_blocks,
            hasher: RandomState::new(),
            clock: 0,
            stats: PrefixStats::default(),
            bytes: 0,
        })
    }

    fn key(&self, parent: u64, tokens: &[u32]) -> u64 {
        self.hasher.hash_one((parent, tokens))
    }

    /// Tokens cached now.
    pub fn tokens(&self) -> usize {
        self.blocks.len() * B
    }

    /// Tokens of protected blocks (reused by a later lookup): when they fill their share of
    /// the capacity, shared prefixes are being pushed back on probation by one another.
    pub fn protected_tokens(&self) -> usize {
        self.blocks.values().filter(|b| b.protected).count() * B
    }

    /// Bytes the cached K/V take (kept as blocks come and go: the engine reads it every turn).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Counters since the cache was made.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// The keys of the cached blocks of `namespace` that start `tokens`, holding at least
    /// `min_depth` layers and what `needs` asks, leaving at least one token after them.
    fn chain(&self, tokens: &[u32], min_depth: usize, namespace: u64, needs: Needs) -> Vec<u64> {
        let usable = tokens.len().saturating_sub(1) / B;
        let mut keys = Vec::new();
        let mut parent = namespace;
        for block in tokens.chunks_exact(B).take(usable) {
            let key = self.key(parent, block);
            match self.blocks.get(&key) {
                Some(b)
                    if b.parent == parent
                        && b.tokens == block
                        && b.depth >= min_depth
                        && needs.met_by(b) =>
                {
                    keys.push(key);
                }
                _ => break,
            }
            parent = key;
        }
        keys
    }

    /// Protect a reused chain, then send the least recently used protected blocks back on
    /// probation past their share (deepest first, by the stamps: a chain's protected blocks stay
    /// its first ones).
    fn protect(&mut self, keys: &[u64]) {
        for key in keys {
            if let Some(b) = self.blocks.get_mut(key) {
                b.protected = true;
            }
        }
        let (num, den) = PROTECTED_SHARE;
        let share = self.capacity_blocks * num / den;
        let mut protected: Vec<_> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.protected)
            .map(|(k, b)| (b.last_used, *k))
            .collect();
        if protected.len() > share {
            protected.sort_unstable();
            for (_, key) in &protected[..protected.len() - share] {
                if let Some(b) = self.blocks.get_mut(key) {
                    b.protected = false;
                }
            }
        }
    }

    /// Stamp a chain, deepest block first, so each block is more recent than its descendants.
    fn touch(&mut self, keys: &[u64]) {
        for key in keys.iter().rev() {
            self.clock += 1;
            if let Some(b) = self.blocks.get_mut(key) {
                b.last_used = self.clock;
            }
        }
    }

    /// Copy the longest cached prefix of `tokens` in `namespace` (blocks of at least `min_depth`
    /// layers) into `cache`, which must be one empty row. Returns the tokens loaded and the
    /// layers they hold (the shallowest block's depth; layers above it are not written).
    pub fn load(
        &mut self,
        tokens: &[u32],
        min_depth: usize,
        cache: &mut KvCache,
        namespace: u64,
    ) -> (usize, usize) {
        self.load_blocks(tokens, min_depth, cache, namespace, Needs::Kv, None)
    }

    /// Tokens of `tokens` the cache could give a prefill in `namespace` with at least
    /// `min_depth` layers (nothing is counted or stamped).
    pub fn cached(&self, tokens: &[u32], min_depth: usize, namespace: u64) -> usize {
        self.chain(tokens, min_depth, namespace, Needs::Kv).len() * B
    }

    /// Tokens of `tokens` whose unsteered part a steered prefill left to resume after
    /// `layer` (nothing is counted or stamped).
    pub fn resumable(&self, tokens: &[u32], layer: usize) -> usize {
        let needs = Needs::ResumeAfter(layer);
        self.chain(tokens, layer + 1, UNSTEERED, needs).len() * B
    }

    /// Copy the longest unsteered prefix of `tokens` that can resume after `layer` into
    /// `cache` (one empty row): the KV of layers `0..=layer` only, and the residual after
    /// `layer` at each position, appended to `residuals` (row-major `[tokens loaded, hidden]`).
    /// Returns the tokens loaded; the cache's fill is left after them.
    pub fn load_resuming(
        &mut self,
        tokens: &[u32],
        layer: usize,
        cache: &mut KvCache,
        residuals: &mut Vec<f32>,
    ) -> usize {
        let needs = Needs::ResumeAfter(layer);
        self.load_blocks(tokens, layer + 1, cache, UNSTEERED, needs, Some(residuals))
            .0
    }

    /// [`Self::load`] for a scored prompt: only blocks that kept the head's inputs, which are
    /// appended to `head_inputs` (row-major `[tokens loaded, hidden]`).
    pub fn load_scored(
        &mut self,
        tokens: &[u32],
        cache: &mut KvCache,
        namespace: u64,
        head_inputs: &mut Vec<f32>,
    ) -> (usize, usize) {
        let depth = cache.num_layers();
        let needs = Needs::HeadInputs;
        self.load_blocks(tokens, depth, cache, namespace, needs, Some(head_inputs))
    }

    /// Load the chain; with `ResumeAfter`, only the layers up to it.
    fn load_blocks(
        &mut self,
        tokens: &[u32],
        min_depth: usize,
        cache: &mut KvCache,
        namespace: u64,
        needs: Needs,
        mut residuals: Option<&mut Vec<f32>>,
    ) -> (usize, usize) {
        debug_assert_eq!(cache.fill(), &[0], "the prefix loads into one empty row");
        let keys = self.chain(tokens, min_depth, namespace, needs);
        self.stats.lookups += 1;
        self.stats.lookup_tokens += tokens.len() as u64;
        if keys.is_empty() {
            return (0, 0);
        }
        self.touch(&keys);
        self.protect(&keys);
        let depth = match needs {
            Needs::ResumeAfter(layer) => layer + 1,
            Needs::Kv | Needs::HeadInputs => {
                keys.iter().map(|k| self.blocks[k].depth).min().unwrap_or(0)
            }
        };
        cache.reserve(keys.len() * B);
        for key in &keys {
            let block = &self.blocks[key];
            for layer in 0..depth {
                let k = block.keys.index_axis(Axis(0), layer).insert_axis(Axis(0));
                let v = block.values.index_axis(Axis(0), layer).insert_axis(Axis(0));
                cache.write(layer, k, v);
            }
            let kept = match needs {
                Needs::Kv => None,
                Needs::HeadInputs => block.head_inputs.as_ref(),
                Needs::ResumeAfter(_) => block.resume.as_ref().map(|(_, r)| r),
            };
            if let (Some(out), Some(r)) = (residuals.as_deref_mut(), kept) {
                out.extend(r.iter());
            }
            cache.advance(B);
        }
        let reused = keys.len() * B;
        self.stats.hits += 1;
        self.stats.reused_tokens += reused as u64;
        (reused, depth)
    }

    /// Store the whole blocks of `tokens` from row 0 of `cache` (which holds them, `depth` layers
    /// deep) in `namespace`, except blocks already cached at least as deep; then evict down to
    /// capacity. New blocks go on probation, and only as many as the protected blocks leave room
    /// for are copied: deeper ones would be the first to go, and copying a long prompt whole
    /// would overshoot the memory bound.
    pub fn insert(&mut self, tokens: &[u32], cache: &KvCache, depth: usize, namespace: u64) {
        self.store(tokens, cache, depth, namespace, Keeps::Kv);
    }

    /// Store the unsteered part of a prefill of `tokens` (row 0 of `cache`, whose layers
    /// `0..=layer` are unsteered: unsteered throughout, or steered first after `layer`) as
    /// unsteered blocks of depth `layer + 1` keeping `residuals` (`[tokens, hidden]`, after
    /// `layer`, before the hook), so that a prefill steered otherwise resumes there. Cached
    /// unsteered blocks at least that deep only gain the residuals.
    pub fn insert_resumable(
        &mut self,
        tokens: &[u32],
        cache: &KvCache,
        layer: usize,
        residuals: ArrayView2<'_, f32>,
    ) {
        let keeps = Keeps::ResumeAfter(layer, residuals);
        self.store(tokens, cache, layer + 1, UNSTEERED, keeps);
    }

    /// [`Self::insert`] for a scored prompt, computed through every layer: its blocks also keep
    /// the head's inputs at their positions (`head_inputs`, `[tokens, hidden]`), and blocks
    /// cached without them get them.
    pub fn insert_scored(
        &mut self,
        tokens: &[u32],
        cache: &KvCache,
        namespace: u64,
        head_inputs: ArrayView2<'_, f32>,
    ) {
        let depth = cache.num_layers();
        self.store(
            tokens,
            cache,
            depth,
            namespace,
            Keeps::HeadInputs(head_inputs),
        );
    }

    fn store(
        &mut self,
        tokens: &[u32],
        cache: &KvCache,
        depth: usize,
        namespace: u64,
        keeps: Keeps<'_>,
    ) {
        let mut held = cache.fill().first().copied().unwrap_or(0).min(tokens.len());
        if let Some(rows) = keeps.rows() {
            held = held.min(rows);
        }
        let mut keys = Vec::new();
        let mut parent = namespace;
        let protected = self.blocks.values().filter(|b| b.protected).count();
        let mut room = self.capacity_blocks - protected;
        for (i, block) in tokens[..held].chunks_exact(B).enumerate() {
            let key = self.key(parent, block);
            let cached = self
                .blocks
                .get(&key)
                .filter(|b| b.parent == parent && b.tokens == block);
            let (deep, kept, was_protected) = cached.map_or((false, false, false), |b| {
                (b.depth >= depth, keeps.needs().met_by(b), b.protected)
            });
            // the chain's blocks on probation, cached or new, share the room
            if !was_protected {
                if room == 0 {
                    break;
                }
                room -= 1;
            }
            let slots = i * B..(i + 1) * B;
            if let (true, false, Keeps::ResumeAfter(layer, r)) = (deep, kept, &keeps) {
                // deep enough already (an unsteered prefill's): it only gains the residuals
                let b = self.blocks.get_mut(&key).expect("cached");
                self.bytes -= b.bytes();
                b.resume = Some((*layer, r.slice(s![slots.clone(), ..]).to_owned()));
                self.bytes += b.bytes();
            } else if !(deep && kept) {
                let replaced = self.blocks.remove(&key);
                if let Some(b) = &replaced {
                    self.bytes -= b.bytes();
                }
                let copy = |layer: usize, keys: bool| {
                    let (k, v) = cache.layer(layer);
                    let buf = if keys { k } else { v };
                    buf.slice(s![0, .., slots.clone(), ..]).to_owned()
                };
                let stack = |keys: bool| {
                    let layers: Vec<_> = (0..depth).map(|l| copy(l, keys)).collect();
                    let views: Vec<_> = layers.iter().map(|a| a.view()).collect();
                    ndarray::stack(Axis(0), &views).expect("layers of one cache have one shape")
                };
                let tokens: [u32; B] = block.try_into().expect("chunks_exact gives whole blocks");
                let new = Block {
                    parent,
                    tokens,
                    depth,
                    keys: stack(true),
                    values: stack(false),
                    head_inputs: match &keeps {
                        Keeps::HeadInputs(h) => Some(h.slice(s![slots.clone(), ..]).to_owned()),
                        _ => None,
                    },
                    resume: match &keeps {
                        Keeps::ResumeAfter(layer, r) => {
                            Some((*layer, r.slice(s![slots.clone(), ..]).to_owned()))
                        }
                        // a deeper copy of an unsteered block keeps its resume point: its
                        // layers up to it are the same KV
                        _ => replaced.and_then(|b| b.resume),
                    },
                    last_used: 0,
                    // an upgrade to more layers keeps the block's standing
                    protected: was_protected,
                };
                self.bytes += new.bytes();
                self.blocks.insert(key, new);
            }
            keys.push(key);
            parent = key;
        }
        self.touch(&keys);
        while self.blocks.len() > self.capacity_blocks {
            let oldest = self
                .blocks
                .iter()
                .min_by_key(|(_, b)| (b.protected, b.last_used))
                .map(|(k, _)| *k)
                .expect("over capacity means not empty");
            if let Some(evicted) = self.blocks.remove(&oldest) {
                self.bytes -= evicted.bytes();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::Array4;

    use super::*;

    /// A one-row cache of `n` tokens whose K/V encode (layer, slot) and a tag.
    fn filled(tokens: usize, layers: usize, tag: f32) -> KvCache {
        let mut c = KvCache::with_rows(layers, 1, 2, 1, 0);
        c.reserve(tokens);
        for layer in 0..layers {
            let k = Array4::from_shape_fn((1, 1, tokens, 2), |(_, _, t, d)| {
                tag + (layer * 1000 + t * 10 + d) as f32
            });
            c.write(layer, k.view(), (-&k).view());
        }
        c.advance(tokens);
        c
    }

    fn ids(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    #[test]
    fn reuses_the_longest_cached_prefix_and_leaves_a_token_to_run() {
        let mut p = PrefixCache::new(64 * B).unwrap();
        let prompt = ids(3 * B + 5, 1);
        p.insert(&prompt, &filled(prompt.len(), 2, 0.0), 2, UNSTEERED);
        assert_eq!(p.tokens(), 3 * B);

        // same system prompt, another question
        let mut other = prompt[..2 * B + 3].to_vec();
        other.extend(ids(20, 99));
        let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
        assert_eq!(p.load(&other, 2, &mut c, UNSTEERED), (2 * B, 2));
        assert_eq!(c.fill(), &[2 * B]);
        assert_eq!(
            c.layer(1).0[[0, 0, 2 * B - 1, 1]],
            (1000 + (2 * B - 1) * 10 + 1) as f32
        );
        assert_eq!(c.layer(1).1[[0, 0, 3, 0]], -(1000.0 + 30.0));

        // a prompt of exactly three cached blocks reuses two: its last token must run
        let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
        assert_eq!(p.load(&prompt[..3 * B], 2, &mut c, UNSTEERED).0, 2 * B);
        let stats = p.stats();
        assert_eq!(
            (stats.lookups, stats.hits, stats.reused_tokens),
            (2, 2, 4 * B as u64)
        );
    }

    #[test]
    fn a_different_first_block_or_too_shallow_blocks_miss() {
        let mut p = PrefixCache::new(64 * B).unwrap();
        let prompt = ids(3 * B, 1);
        p.insert(&prompt, &filled(prompt.len(), 3, 0.0), 2, UNSTEERED);
        let mut changed = prompt.clone();
        changed[0] += 1;
        let mut c = KvCache::with_rows(3, 1, 2, 1, 0);
        assert_eq!(p.load(&changed, 2, &mut c, UNSTEERED), (0, 0));
        assert_eq!(
            p.load(&prompt, 3, &mut c, UNSTEERED),
            (0, 0),
            "depth 2 cannot serve 3 layers"
        );
        // a full prefill upgrades the blocks
        p.insert(&prompt, &filled(prompt.len(), 3, 0.0), 3, UNSTEERED);
        assert_eq!(p.load(&prompt, 3, &mut c, UNSTEERED), (2 * B, 3));
        assert_eq!(
            p.bytes(),
            3 * 2 * 3 * B * 2 * 4,
            "three blocks, upgraded to 3 layers"
        );
        assert_eq!(p.stats().hits, 1);
    }

    #[test]
    fn evicts_least_recently_used_blocks_deepest_first() {
        let mut p = PrefixCache::new(4 * B).unwrap();
        let shared = ids(3 * B, 1);
        p.insert(&shared, &filled(shared.len(), 1, 0.0), 1, UNSTEERED);
        let other = ids(2 * B, 500);
        p.insert(&other, &filled(other.len(), 1, 0.0), 1, UNSTEERED);
        // 5 blocks for 4 places: the shared chain's deepest block went
        assert_eq!(p.tokens(), 4 * B);
        let mut c = KvCache::with_rows(1, 1, 2, 1, 0);
        assert_eq!(p.load(&shared, 1, &mut c, UNSTEERED).0, 2 * B);
        // the shared prefix is now the most recent: the other chain goes, its last block first
        let third = ids(2 * B, 900);
        p.insert(&third, &filled(third.len(), 1, 0.0), 1, UNSTEERED);
        let mut c = KvCache::with_rows(1, 1, 2, 1, 0);
        assert_eq!(p.load(&shared, 1, &mut c, UNSTEERED).0, 2 * B);
        let mut c = KvCache::with_rows(1, 1, 2, 1, 0);
        assert_eq!(p.load(&other, 1, &mut c, UNSTEERED).0, 0);
        let held: usize = p.blocks.values().map(Block::bytes).sum();
        assert!(p.bytes() == held && held > 0 && PrefixCache::new(B - 1).is_none());
    }

    #[test]
    fn namespaces_keep_steered_and_unsteered_kv_apart() {
        let mut p = PrefixCache::new(64 * B).unwrap();
        let prompt = ids(3 * B, 1);
        let steered = 0x5eed;
        p.insert(&prompt, &filled(prompt.len(), 2, 0.0), 2, UNSTEERED);
        let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
        assert_eq!(p.load(&prompt, 2, &mut c, steered), (0, 0));
        p.insert(&prompt, &filled(prompt.len(), 2, 0.5), 2, steered);
        assert_eq!(p.tokens(), 6 * B, "the same tokens, twice");
        for (namespace, tag) in [(UNSTEERED, 0.0), (steered, 0.5)] {
            let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
            assert_eq!(p.load(&prompt, 2, &mut c, namespace), (2 * B, 2));
            assert_eq!(c.layer(1).0[[0, 0, 3, 0]], tag + 1030.0);
        }
        let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
        assert_eq!(p.load(&prompt, 2, &mut c, steered + 1), (0, 0));
    }

    /// Load `tokens` and one more (so that all their blocks may be reused): the tokens reused.
    fn reuse(p: &mut PrefixCache, tokens: &[u32]) -> usize {
        let mut prompt = tokens.to_vec();
        prompt.push(u32::MAX);
        let mut c = KvCache::with_rows(1, 1, 2, 1, 0);
        p.load(&prompt, 1, &mut c, UNSTEERED).0
    }

    #[test]
    fn one_off_prompts_do_not_push_out_a_reused_prefix() {
        let mut p = PrefixCache::new(8 * B).unwrap();
        let system = ids(3 * B, 1);
        p.insert(&system, &filled(system.len(), 1, 0.0), 1, UNSTEERED);
        assert_eq!(p.protected_tokens(), 0, "a block seen once is on probation");
        assert_eq!(reuse(&mut p, &system), 3 * B, "a second request reuses it");
        assert_eq!(p.protected_tokens(), 3 * B);
        // a long prompt seen once (a pasted document, a steered retry) gets only the room the
        // reused prefix leaves, and evicts nothing of it
        let document = ids(20 * B, 500);
        p.insert(&document, &filled(document.len(), 1, 0.0), 1, UNSTEERED);
        assert_eq!(p.tokens(), 8 * B);
        assert_eq!(reuse(&mut p, &system), 3 * B);
        assert_eq!(reuse(&mut p, &document[..5 * B]), 5 * B, "its start fits");
        // once that start is reused too, protected blocks pass their share (6 of 8): the least
        // recently used ones (here the document's deepest, the system prompt being reused
        // again) go back on probation and make room for the next prompt
        assert_eq!(reuse(&mut p, &system), 3 * B);
        let next = ids(4 * B, 900);
        p.insert(&next, &filled(next.len(), 1, 0.0), 1, UNSTEERED);
        assert_eq!(reuse(&mut p, &next), 2 * B, "two blocks of room");
        assert_eq!(reuse(&mut p, &system), 3 * B);
        assert_eq!(reuse(&mut p, &document), 3 * B);
        assert_eq!(p.protected_tokens(), 6 * B, "at most 3/4 of the slots");
        let held: usize = p.blocks.values().map(Block::bytes).sum();
        assert_eq!(p.bytes(), held);
    }

    #[test]
    fn a_prompt_longer_than_the_cache_keeps_its_start() {
        let mut p = PrefixCache::new(2 * B).unwrap();
        let long = ids(10 * B, 3);
        p.insert(&long, &filled(long.len(), 1, 0.0), 1, UNSTEERED);
        assert_eq!(p.tokens(), 2 * B);
        let mut c = KvCache::with_rows(1, 1, 2, 1, 0);
        assert_eq!(p.load(&long, 1, &mut c, UNSTEERED).0, 2 * B);
    }

    #[test]
    fn a_scored_prompt_reuses_only_blocks_that_kept_the_head_inputs() {
        let mut p = PrefixCache::new(64 * B).unwrap();
        let prompt = ids(3 * B + 5, 2);
        let cache = filled(prompt.len(), 2, 0.0);
        let inputs = Array2::from_shape_fn((prompt.len(), 3), |(t, d)| (t * 10 + d) as f32);
        let scored_load = |p: &mut PrefixCache, tokens: &[u32]| {
            let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
            let mut head_inputs = Vec::new();
            let loaded = p.load_scored(tokens, &mut c, UNSTEERED, &mut head_inputs);
            (loaded, head_inputs, c)
        };

        // stored unscored: KV for any prompt, nothing for a scored one
        p.insert(&prompt, &cache, 2, UNSTEERED);
        let ((reused, _), head_inputs, _) = scored_load(&mut p, &prompt);
        assert_eq!((reused, head_inputs.len()), (0, 0));

        // stored scored: the same blocks gain the head inputs, and the KV is unchanged
        let before = p.bytes();
        p.insert_scored(&prompt, &cache, UNSTEERED, inputs.view());
        assert_eq!(p.tokens(), 3 * B);
        assert_eq!(p.bytes(), before + 3 * B * 3 * 4, "head inputs counted");
        let (loaded, head_inputs, c) = scored_load(&mut p, &prompt);
        assert_eq!(loaded, (3 * B, 2));
        let want: Vec<f32> = inputs.slice(s![..3 * B, ..]).iter().copied().collect();
        assert_eq!(head_inputs, want);
        assert_eq!(c.layer(1).0[[0, 0, 5, 1]], (1000 + 5 * 10 + 1) as f32);

        // another question after the same first two blocks reuses those; a plain load still
        // reads the scored blocks' KV; a plain insert keeps their head inputs
        let mut other = prompt[..2 * B + 3].to_vec();
        other.extend(ids(20, 99));
        assert_eq!(scored_load(&mut p, &other).0, (2 * B, 2));
        let mut c = KvCache::with_rows(2, 1, 2, 1, 0);
        assert_eq!(p.load(&prompt, 2, &mut c, UNSTEERED), (3 * B, 2));
        p.insert(&prompt, &cache, 2, UNSTEERED);
        assert_eq!(scored_load(&mut p, &prompt).1, want);
        let held: usize = p.blocks.values().map(Block::bytes).sum();
        assert_eq!(p.bytes(), held);
    }

    #[test]
    fn a_steered_prefills_unsteered_part_resumes_after_its_layer_only() {
        let mut p = PrefixCache::new(64 * B).unwrap();
        let prompt = ids(3 * B + 1, 1);
        let residuals =
            |tag: f32| Array2::from_shape_fn((prompt.len(), 2), |(t, d)| tag + (t * 10 + d) as f32);
        // a steered prefill (4 layers, steered after layer 1) stores layers 0..=1 and the
        // residual after layer 1
        let steered = filled(prompt.len(), 4, 0.0);
        p.insert_resumable(&prompt, &steered, 1, residuals(0.5).view());
        assert_eq!(
            (p.resumable(&prompt, 1), p.resumable(&prompt, 2)),
            (3 * B, 0)
        );
        assert_eq!(p.cached(&prompt, 2, UNSTEERED), 3 * B);
        assert_eq!(
            p.cached(&prompt, 3, UNSTEERED),
            0,
            "the steered layers are not kept"
        );
        let mut c = KvCache::with_rows(4, 1, 2, 1, 0);
        let mut got = Vec::new();
        assert_eq!(p.load_resuming(&prompt, 1, &mut c, &mut got), 3 * B);
        let want = residuals(0.5)
            .slice(s![..3 * B, ..])
            .iter()
            .copied()
            .collect::<Vec<_>>();
        assert_eq!(got, want);
        assert_eq!(c.layer(1).0[[0, 0, 5, 1]], (1000 + 5 * 10 + 1) as f32);
        assert_eq!(
            c.layer(2).0[[0, 0, 5, 1]],
            0.0,
            "layers after the resume point unloaded"
        );

        // an unsteered prefill of the same prompt deepens the blocks and keeps the resume
        // point; a steered one on deep unsteered blocks only adds its residuals
        p.insert(&prompt, &filled(prompt.len(), 4, 0.0), 4, UNSTEERED);
        assert_eq!(
            (p.cached(&prompt, 4, UNSTEERED), p.resumable(&prompt, 1)),
            (3 * B, 3 * B)
        );
        let other = ids(2 * B + 1, 300);
        p.insert(&other, &filled(other.len(), 4, 0.0), 4, UNSTEERED);
        let before = p.bytes();
        let r = Array2::from_shape_fn((other.len(), 2), |(t, d)| (t + d) as f32);
        p.insert_resumable(&other, &filled(other.len(), 4, 9.0), 1, r.view());
        assert_eq!(p.resumable(&other, 1), 2 * B);
        assert_eq!(
            p.bytes(),
            before + 2 * B * 2 * 4,
            "two blocks gained their residuals"
        );
        let mut c = KvCache::with_rows(4, 1, 2, 1, 0);
        assert_eq!(p.load(&other, 4, &mut c, UNSTEERED), (2 * B, 4));
        assert_eq!(
            c.layer(0).0[[0, 0, 0, 0]],
            0.0,
            "the unsteered KV is kept, not replaced"
        );
        let held: usize = p.blocks.values().map(Block::bytes).sum();
        assert_eq!(p.bytes(), held);
    }
}
