//! The KV cache: one preallocated buffer per layer, `[batch, kv_heads, capacity, head_dim]`.
//!
//! How it avoids copying: the layer graphs take the whole buffer as their `past_key`/`past_value`
//! input (passed to ONNX Runtime by reference, not copied). A plain layer graph reads it with an
//! attention mask that marks which slots of each row hold tokens and returns only the new
//! positions' K/V, which the runtime writes into the next free slots of each row. A fused layer
//! graph (GroupQueryAttention) is given the same buffer as its `present` output too, and appends
//! the new slots itself: that is why the buffers live in memory ONNX Runtime allocated (it binds
//! only such tensors to outputs). Nothing is copied wholesale per step; a buffer is reallocated
//! only when it runs out of room (it grows by whole chunks, so that is rare) and when rows join
//! or leave a batch.
//!
//! Rows fill independently: in a batch, each row has its own count of cached tokens, so rows of
//! different lengths need no padding, and positions are simply the row's token count.

use ndarray::{Array2, ArrayView4, ArrayViewMut4, Axis, Ix4, s};
use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::value::Tensor;

/// Slots added at a time when the buffer grows.
const CHUNK: usize = 64;

/// Slots a buffer holding `tokens` tokens has: they come in whole chunks.
pub(crate) fn slots(tokens: usize) -> usize {
    tokens.div_ceil(CHUNK) * CHUNK
}

/// One layer's keys or values, `[rows, kv_heads, slots, head_dim]`, in memory ONNX Runtime
/// allocated (`None` while it holds no element: ONNX Runtime gives such a tensor no data).
#[derive(Debug)]
pub(crate) struct Buffer {
    shape: [usize; 4],
    tensor: Option<Tensor<f32>>,
}

impl Buffer {
    /// A zero-filled buffer. Zeros, not whatever the allocator returns: unfilled slots are masked
    /// out, but a NaN there would still reach the output through a zero attention weight.
    fn zeros(shape: [usize; 4]) -> Self {
        let tensor = (shape.iter().product::<usize>() > 0).then(|| {
            // the cache's size is bounded by the engine's KV budget; failing to allocate it is
            // out of memory, which the ndarray buffers before this one aborted on as well
            let mut t = Tensor::<f32>::new(&Allocator::default(), shape)
                .expect("allocating a KV-cache buffer");
            t.extract_array_mut().fill(0.0);
            t
        });
        Self { shape, tensor }
    }

    fn view(&self) -> ArrayView4<'_, f32> {
        match &self.tensor {
            Some(t) => t
                .extract_array()
                .into_dimensionality::<Ix4>()
                .expect("a 4-D buffer"),
            None => ArrayView4::from_shape(self.shape, &[]).expect("an empty shape"),
        }
    }

    fn view_mut(&mut self) -> ArrayViewMut4<'_, f32> {
        match &mut self.tensor {
            Some(t) => t
                .extract_array_mut()
                .into_dimensionality::<Ix4>()
                .expect("a 4-D buffer"),
            None => ArrayViewMut4::from_shape(self.shape, &mut []).expect("an empty shape"),
        }
    }

    /// The tensor, to bind as a graph's input and output (`None` when empty).
    pub(crate) fn tensor_mut(&mut self) -> Option<&mut Tensor<f32>> {
        self.tensor.as_mut()
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Clone for Buffer {
    fn clone(&self) -> Self {
        let mut copy = Buffer::zeros(self.shape);
        copy.view_mut().assign(&self.view());
        copy
    }
}

/// Per-layer K/V buffers and per-row fill levels. (`Default` is a cache of no layers.)
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    keys: Vec<Buffer>,
    values: Vec<Buffer>,
    fill: Vec<usize>,
    kv_heads: usize,
    head_dim: usize,
    bindings: Bindings,
}

/// Layer graphs' ONNX Runtime bindings to a cache's buffers, kept between runs (index: the
/// graph's segment; see `model::run_fused`), so that a decode step binds only what changed
/// since the last one, each with the session it was made for. A binding holds the buffers it
/// binds, so the cache drops its bindings whenever it replaces its buffers: a binding never
/// keeps old buffers alive (or bound). A clone starts without any.
#[derive(Default)]
struct Bindings(Vec<Option<(usize, IoBinding)>>);

impl Clone for Bindings {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for Bindings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} kept", self.0.iter().flatten().count())
    }
}

impl KvCache {
    /// An empty cache (no rows) for a model's shape.
    pub fn new(num_layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        Self::with_rows(num_layers, kv_heads, head_dim, 0, 0)
    }

    /// An empty cache with `rows` rows and room for `capacity` tokens each.
    pub fn with_rows(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        rows: usize,
        capacity: usize,
    ) -> Self {
        let buf = || Buffer::zeros([rows, kv_heads, capacity, head_dim]);
        Self {
            keys: (0..num_layers).map(|_| buf()).collect(),
            values: (0..num_layers).map(|_| buf()).collect(),
            fill: vec![0; rows],
            kv_heads,
            head_dim,
            bindings: Bindings::default(),
        }
    }

    /// Layers it holds KV for.
    pub fn num_layers(&self) -> usize {
        self.keys.len()
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.fill.len()
    }

    /// Slots per row in the buffers.
    pub fn capacity(&self) -> usize {
        self.keys.first().map_or(0, |k| k.shape[2])
    }

    /// Cached tokens of each row.
    pub fn fill(&self) -> &[usize] {
        &self.fill
    }

    /// The buffers of one layer, `[rows, kv_heads, capacity, head_dim]`.
    pub fn layer(&self, layer: usize) -> (ArrayView4<'_, f32>, ArrayView4<'_, f32>) {
        (self.keys[layer].view(), self.values[layer].view())
    }

    /// The buffers of one layer as ONNX Runtime tensors, for a graph that appends to them in
    /// place (`None` while the cache has no slots).
    pub(crate) fn layer_tensors(
        &mut self,
        layer: usize,
    ) -> Option<(&mut Tensor<f32>, &mut Tensor<f32>)> {
        Some((
            self.keys[layer].tensor_mut()?,
            self.values[layer].tensor_mut()?,
        ))
    }

    /// The binding of layer graph `segment` to these buffers that [`Self::keep_binding`] kept
    /// for `session` (an identity: the session's address), if the buffers are the same since.
    pub(crate) fn take_binding(&mut self, segment: usize, session: usize) -> Option<IoBinding> {
        let (made_for, binding) = self.bindings.0.get_mut(segment)?.take()?;
        (made_for == session).then_some(binding)
    }

    /// Keep a binding of layer graph `segment` to these buffers for its next run in `session`.
    pub(crate) fn keep_binding(&mut self, segment: usize, session: usize, binding: IoBinding) {
        let kept = &mut self.bindings.0;
        if kept.len() <= segment {
            kept.resize_with(segment + 1, || None);
        }
        kept[segment] = Some((session, binding));
    }

    /// Make room for `extra` more tokens in every row, growing by whole chunks.
    pub fn reserve(&mut self, extra: usize) {
        let need = self.fill.iter().max().copied().unwrap_or(0) + extra;
        if need <= self.capacity() {
            return;
        }
        self.bindings = Bindings::default();
        let capacity = slots(need);
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut grown =
                Buffer::zeros([self.fill.len(), self.kv_heads, capacity, self.head_dim]);
            let old = buf.shape[2];
            grown
                .view_mut()
                .slice_mut(s![.., .., ..old, ..])
                .assign(&buf.view());
            *buf = grown;
        }
    }

    /// The attention mask for a step adding `new` tokens per row: `[rows, capacity + new]`, 1 for
    /// a row's filled slots and for the new positions.
    pub fn attention_mask(&self, new: usize) -> Array2<i64> {
        let cap = self.capacity();
        Array2::from_shape_fn((self.rows(), cap + new), |(row, slot)| {
            i64::from(slot >= cap || slot < self.fill[row])
        })
    }

    /// The attention mask for a step of `width` new positions in which row `r` adds only
    /// `new[r]` tokens (the rest of its positions are padding, masked out).
    pub fn ragged_attention_mask(&self, new: &[usize], width: usize) -> Array2<i64> {
        let cap = self.capacity();
        Array2::from_shape_fn((self.rows(), cap + width), |(row, slot)| {
            let filled = slot < self.fill[row];
            i64::from(filled || (slot >= cap && slot - cap < new[row]))
        })
    }

    /// Count `new[r]` more cached tokens in row `r`.
    pub fn advance_rows(&mut self, new: &[usize]) {
        self.fill.iter_mut().zip(new).for_each(|(f, n)| *f += n);
    }

    /// A one-row cache holding a copy of row `row`'s filled slots.
    pub fn row(&self, row: usize) -> KvCache {
        let fill = self.fill[row];
        let copy = |bufs: &[Buffer]| -> Vec<Buffer> {
            bufs.iter()
                .map(|b| {
                    let mut one = Buffer::zeros([1, self.kv_heads, slots(fill), self.head_dim]);
                    one.view_mut()
                        .slice_mut(s![0, .., ..fill, ..])
                        .assign(&b.view().slice(s![row, .., ..fill, ..]));
                    one
                })
                .collect()
        };
        KvCache {
            keys: copy(&self.keys),
            values: copy(&self.values),
            fill: vec![fill],
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            bindings: Bindings::default(),
        }
    }

    /// Positions of `new` tokens appended to each row.
    pub fn positions(&self, new: usize) -> Array2<i64> {
        Array2::from_shape_fn((self.rows(), new), |(row, i)| (self.fill[row] + i) as i64)
    }

    /// Store the new positions' K/V (`[rows, kv_heads, new, head_dim]`) of one layer after each
    /// row's filled slots. Call [`Self::advance`] once all layers are written.
    pub fn write(&mut self, layer: usize, keys: ArrayView4<f32>, values: ArrayView4<f32>) {
        let new = keys.len_of(Axis(2));
        let (mut k, mut v) = (self.keys[layer].view_mut(), self.values[layer].view_mut());
        for (row, &fill) in self.fill.iter().enumerate() {
            k.slice_mut(s![row, .., fill..fill + new, ..])
                .assign(&keys.index_axis(Axis(0), row));
            v.slice_mut(s![row, .., fill..fill + new, ..])
                .assign(&values.index_axis(Axis(0), row));
        }
    }

    /// Count `new` more cached tokens in every row.
    pub fn advance(&mut self, new: usize) {
        self.fill.iter_mut().for_each(|f| *f += new);
    }

    /// Forget every row's tokens after the first `tokens` (their slots are overwritten by the
    /// next writes). A chunked prefill that gated on the first layers rewinds this way to run
    /// the remaining layers over the same slots.
    pub fn truncate(&mut self, tokens: usize) {
        self.fill.iter_mut().for_each(|f| *f = (*f).min(tokens));
    }

    /// Bytes held by the K/V buffers (allocated slots, filled or not).
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|b| b.len() * std::mem::size_of::<f32>())
            .sum()
    }

    /// Append the rows of `other` (same model) to this batch.
    pub fn append_rows(&mut self, other: &KvCache) {
        self.replace_rows(&[], other);
    }

    /// Drop the rows `rows` from the batch.
    pub fn remove_rows(&mut self, rows: &[usize]) {
        if rows.is_empty() {
            return;
        }
        let none = KvCache::new(self.num_layers(), self.kv_heads, self.head_dim);
        self.replace_rows(rows, &none);
    }

    /// Drop the rows `leaving` and append the rows of `joining` (same model) after the rest, in
    /// one copy of the rows that stay: every change of the batch's rows reallocates every
    /// buffer (hundreds of MB for a batch of long rows, in fresh pages), so rows that finish in
    /// the same step leave together, and the engine lets finished rows leave with the next row
    /// that joins. The buffers are sized to the longest row plus one token (in whole chunks), so
    /// memory held by a long row that left is given back and the next decode step needs no
    /// growth.
    pub fn replace_rows(&mut self, leaving: &[usize], joining: &KvCache) {
        let keep: Vec<usize> = (0..self.rows()).filter(|r| !leaving.contains(r)).collect();
        if keep.len() == self.rows() && joining.rows() == 0 {
            return;
        }
        assert_eq!(
            joining.num_layers(),
            self.num_layers(),
            "rows of another model"
        );
        self.bindings = Bindings::default();
        let kept = keep.iter().map(|&r| self.fill[r]);
        self.fill = kept.chain(joining.fill.iter().copied()).collect();
        let longest = self.fill.iter().max().copied().unwrap_or(0);
        let shape = [
            self.fill.len(),
            self.kv_heads,
            slots(longest + 1),
            self.head_dim,
        ];
        let mine = self.keys.iter_mut().chain(self.values.iter_mut());
        let theirs = joining.keys.iter().chain(&joining.values);
        for (buf, other) in mine.zip(theirs) {
            *buf = rebuilt(buf, &keep, other, shape);
        }
    }
}

/// A buffer of `shape` holding the rows `keep` of `mine`, then every row of `theirs`; the
/// slots neither holds are zeros.
fn rebuilt(mine: &Buffer, keep: &[usize], theirs: &Buffer, shape: [usize; 4]) -> Buffer {
    let mut out = Buffer::zeros(shape);
    let mut to = out.view_mut();
    let (from, capacity) = (mine.view(), shape[2].min(mine.shape[2]));
    for (row, &r) in keep.iter().enumerate() {
        to.slice_mut(s![row, .., ..capacity, ..])
            .assign(&from.slice(s![r, .., ..capacity, ..]));
    }
    let capacity = shape[2].min(theirs.shape[2]);
    to.slice_mut(s![keep.len().., .., ..capacity, ..])
        .assign(&theirs.view().slice(s![.., .., ..capacity, ..]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(rows: usize, tokens: usize, base: f32) -> KvCache {
        let mut c = KvCache::with_rows(2, 1, 2, rows, 0);
        c.reserve(tokens);
        let k = ndarray::Array4::from_shape_fn((rows, 1, tokens, 2), |(r, _, t, d)| {
            base + (r * 100 + t * 10 + d) as f32
        });
        for layer in 0..2 {
            c.write(layer, k.view(), k.view());
        }
        c.advance(tokens);
        c
    }

    #[test]
    fn grows_in_chunks_and_keeps_content() {
        let mut c = filled(1, 3, 0.0);
        assert_eq!(c.capacity(), CHUNK);
        c.reserve(CHUNK);
        assert_eq!(c.capacity(), 2 * CHUNK);
        assert_eq!(c.layer(1).0[[0, 0, 2, 1]], 21.0);
    }

    #[test]
    fn a_long_row_leaving_gives_its_slots_back() {
        let mut c = filled(1, 3, 0.0);
        c.append_rows(&filled(1, 3 * CHUNK, 1000.0));
        // room for the long row's next token too
        assert_eq!(c.capacity(), 4 * CHUNK);
        c.remove_rows(&[1]);
        assert_eq!(c.capacity(), CHUNK);
        assert_eq!(c.layer(1).0[[0, 0, 2, 1]], 21.0);
        c.remove_rows(&[0]);
        assert_eq!((c.rows(), c.capacity(), c.bytes()), (0, CHUNK, 0));
    }

    #[test]
    fn truncate_rewinds_the_fill() {
        let mut c = filled(2, 5, 0.0);
        c.truncate(2);
        assert_eq!(c.fill(), &[2, 2]);
        assert_eq!(c.positions(1).into_raw_vec_and_offset().0, vec![2, 2]);
    }

    #[test]
    fn mask_and_positions_follow_each_row() {
        let mut c = filled(1, 3, 0.0);
        c.append_rows(&filled(1, 1, 0.0));
        assert_eq!(c.fill(), &[3, 1]);
        let m = c.attention_mask(1);
        assert_eq!(m.shape(), &[2, CHUNK + 1]);
        assert_eq!(m.row(0).sum(), 4);
        assert_eq!(m.row(1).sum(), 2);
        assert_eq!(m[[1, CHUNK]], 1);
        assert_eq!(c.positions(1).into_raw_vec_and_offset().0, vec![3, 1]);
    }

    #[test]
    fn joining_and_leaving_keep_other_rows_intact() {
        let mut c = filled(2, 3, 0.0);
        c.append_rows(&filled(1, 5, 1000.0));
        assert_eq!(c.rows(), 3);
        assert_eq!(c.layer(0).0[[2, 0, 4, 1]], 1041.0);
        c.remove_rows(&[1]);
        assert_eq!(c.fill(), &[3, 5]);
        assert_eq!(c.bytes(), 2 * 2 * 2 * CHUNK * 2 * 4);
        assert_eq!(c.layer(0).1[[0, 0, 2, 0]], 20.0);
        assert_eq!(c.layer(0).1[[1, 0, 4, 1]], 1041.0);
    }

    #[test]
    fn rows_leave_and_join_in_one_change() {
        let mut c = filled(3, 3, 0.0);
        c.replace_rows(&[1], &filled(1, 2 * CHUNK, 1000.0));
        assert_eq!(c.fill(), &[3, 3, 2 * CHUNK]);
        assert_eq!(c.capacity(), 3 * CHUNK);
        assert_eq!(c.layer(0).0[[1, 0, 2, 1]], 221.0);
        assert_eq!(
            c.layer(1).1[[2, 0, 2 * CHUNK - 1, 0]],
            1000.0 + ((2 * CHUNK - 1) * 10) as f32
        );
        // the joining row's unfilled slot is zero, as every unfilled slot is
        assert_eq!(c.layer(1).1[[2, 0, 2 * CHUNK, 0]], 0.0);
        assert_eq!(c.layer(1).1[[0, 0, 3, 0]], 0.0);
    }

    #[test]
    fn rows_leaving_together_keep_the_others_in_order() {
        let mut c = filled(2, 3, 0.0);
        c.append_rows(&filled(1, 2 * CHUNK, 1000.0));
        c.append_rows(&filled(1, 5, 2000.0));
        c.remove_rows(&[0, 2]);
        assert_eq!(c.fill(), &[3, 5]);
        assert_eq!(c.capacity(), CHUNK);
        assert_eq!(c.layer(1).0[[0, 0, 2, 1]], 121.0);
        assert_eq!(c.layer(1).1[[1, 0, 4, 0]], 2040.0);
        c.remove_rows(&[]);
        assert_eq!(c.rows(), 2);
        c.remove_rows(&[0, 1]);
        assert_eq!((c.rows(), c.bytes()), (0, 0));
    }
}
