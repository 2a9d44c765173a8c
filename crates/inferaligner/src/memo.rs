//! Gate activations of views already read, so that a view every request of a deployment
//! carries (the operator's system prompt, read since the gate reads system messages too) is run
//! to the gate layer once, not on every request.
//!
//! An activation depends only on the view's tokens, the layer and where its mean starts: not on
//! the pack's direction, bias or policy, so a pack reload keeps the entries that still apply
//! (the layer is in the key). The prefix cache cannot do this job: it keeps K/V, and the gate's
//! mean readout needs every position's residual.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Views remembered by default: an operator's system prompt is one to three views (its first
/// and last blocks); a few hundred cover many deployments' prompts and the documents pasted
/// more than once, at a few KiB each (`2 × hidden` floats).
pub const VIEW_MEMO_ENTRIES: usize = 256;

/// Activations by view, least recently used out first. Shared by the requests of one engine.
#[derive(Debug)]
pub struct ViewMemo {
    inner: Mutex<Inner>,
    capacity: usize,
    /// Seeded per process, so a client cannot craft colliding views (the tokens are compared
    /// too).
    hasher: std::collections::hash_map::RandomState,
    lookups: AtomicU64,
    hits: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<u64, Entry>,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    layer: usize,
    view: Vec<u32>,
    mean_from: Option<usize>,
    activation: Vec<f32>,
    last_used: u64,
}

impl ViewMemo {
    /// A memo of at most `capacity` views (0: remembers nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            capacity,
            hasher: Default::default(),
            lookups: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn key(&self, layer: usize, view: &[u32], mean_from: Option<usize>) -> u64 {
        self.hasher.hash_one((layer, view, mean_from))
    }

    /// The activation of `view` at `layer` read from `mean_from`, if remembered.
    pub fn get(&self, layer: usize, view: &[u32], mean_from: Option<usize>) -> Option<Vec<f32>> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let key = self.key(layer, view, mean_from);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        let e = inner.entries.get_mut(&key)?;
        let found = (e.layer == layer && e.view == view && e.mean_from == mean_from).then(|| {
            e.last_used = now;
            e.activation.clone()
        });
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Lookups and the hits among them, since the memo was made (for metrics).
    pub fn counts(&self) -> (u64, u64) {
        (
            self.lookups.load(Ordering::Relaxed),
            self.hits.load(Ordering::Relaxed),
        )
    }

    /// Remember `activation` for `view`, forgetting the least recently used view when full.
    pub fn put(&self, layer: usize, view: &[u32], mean_from: Option<usize>, activation: &[f32]) {
        if self.capacity == 0 {
            return;
        }
        let key = self.key(layer, view, mean_from);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if inner.entries.len() >= self.capacity && !inner.entries.contains_key(&key) {
            // a scan: at a few hundred entries, cheaper than keeping an order
            let oldest = (inner.entries.iter())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                inner.entries.remove(&k);
            }
        }
        inner.entries.insert(
            key,
            Entry {
                layer,
                view: view.to_vec(),
                mean_from,
                activation: activation.to_vec(),
                last_used: now,
            },
        );
    }

    /// Views remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.entries.len())
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_by_view_layer_and_mean_and_forgets_the_least_recently_used() {
        let memo = ViewMemo::new(2);
        memo.put(18, &[1, 2, 3], Some(1), &[0.5, 1.5]);
        assert_eq!(memo.get(18, &[1, 2, 3], Some(1)), Some(vec![0.5, 1.5]));
        assert_eq!(memo.get(17, &[1, 2, 3], Some(1)), None, "another layer");
        assert_eq!(memo.get(18, &[1, 2, 3], None), None, "another readout");
        assert_eq!(memo.get(18, &[1, 2], Some(1)), None, "another view");
        memo.put(18, &[4], None, &[2.0]);
        assert_eq!(memo.get(18, &[1, 2, 3], Some(1)), Some(vec![0.5, 1.5]));
        // full: the view read least recently goes
        memo.put(18, &[5], None, &[3.0]);
        assert_eq!(memo.len(), 2);
        assert_eq!(memo.get(18, &[4], None), None);
        assert_eq!(memo.get(18, &[1, 2, 3], Some(1)), Some(vec![0.5, 1.5]));
        assert_eq!(memo.get(18, &[5], None), Some(vec![3.0]));
        assert_eq!(memo.counts(), (8, 4));
        let off = ViewMemo::new(0);
        off.put(18, &[1], None, &[1.0]);
        assert!(off.is_empty());
    }
}
