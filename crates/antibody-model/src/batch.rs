//! Host-side inputs of a forward pass: padded token batches, their positions, attention
//! masks and rotary tables.

/// A padded batch of token ids, row-major `[batch, seq]`, with its attention mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Token ids, `batch × seq`, row-major.
    pub ids: Vec<u32>,
    /// `true` where a token is real, `false` on padding.
    pub mask: Vec<bool>,
    /// Number of sequences.
    pub batch: usize,
    /// Padded length.
    pub seq: usize,
}

impl TokenBatch {
    /// Pads on the left (generation's layout: every prompt ends at the last column).
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        Self::padded(seqs, pad, true)
    }

    /// Pads on the right (training's usual layout).
    pub fn right_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        Self::padded(seqs, pad, false)
    }

    fn padded(seqs: &[Vec<u32>], pad: u32, left: bool) -> Self {
        let seq = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * seq);
        let mut mask = Vec::with_capacity(seqs.len() * seq);
        for s in seqs {
            let n_pad = seq - s.len();
            if left {
                ids.extend(std::iter::repeat_n(pad, n_pad));
                mask.extend(std::iter::repeat_n(false, n_pad));
            }
            ids.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(true, s.len()));
            if !left {
                ids.extend(std::iter::repeat_n(pad, n_pad));
                mask.extend(std::iter::repeat_n(false, n_pad));
            }
        }
        Self {
            ids,
            mask,
            batch: seqs.len(),
            seq,
        }
    }

    /// Position ids: the number of real tokens before each token, `clamp(cumsum(mask) − 1, 0)`,
    /// so a sequence's logits do not depend on how much padding it has.
    pub fn positions(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.ids.len());
        for row in self.mask.chunks(self.seq.max(1)) {
            let mut n = 0usize;
            for &m in row {
                if m {
                    out.push(n);
                    n += 1;
                } else {
                    out.push(n.saturating_sub(1));
                }
            }
        }
        out
    }
}

/// The boolean attention mask for `tq` new queries over `key_valid.len() / batch` keys, of
/// which the first `past` are cached. `true` = masked out.
///
/// Query `i` (absolute key index `past + i`) sees key `j` when `j ≤ past + i` and the key is a
/// real token; every query always sees itself, so padded queries never produce NaN.
/// Rows are laid out for grouped-query attention: `[batch, n_rep · tq, keys]` with row
/// `r · tq + i` for query `i` of the `r`-th head sharing one KV head.
pub fn attention_mask(
    key_valid: &[bool],
    batch: usize,
    past: usize,
    tq: usize,
    n_rep: usize,
) -> Vec<bool> {
    let keys = key_valid.len() / batch.max(1);
    let mut out = Vec::with_capacity(batch * n_rep * tq * keys);
    for b in 0..batch {
        let valid = &key_valid[b * keys..(b + 1) * keys];
        let mut rows = Vec::with_capacity(tq * keys);
        for i in 0..tq {
            let me = past + i;
            rows.extend((0..keys).map(|j| !(j == me || (j < me && valid[j]))));
        }
        for _ in 0..n_rep {
            out.extend_from_slice(&rows);
        }
    }
    out
}

/// Rotary tables `(cos, sin)`, each `[positions.len(), head_dim]` row-major, in the
/// rotate-half layout of Hugging Face Llama (frequencies repeated twice), computed in f32 as
/// transformers does.
pub fn rope_tables(positions: &[usize], head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|k| 1.0 / (theta as f32).powf((2 * k) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &p in positions {
        for _ in 0..2 {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_layouts_and_positions() {
        let seqs = vec![vec![5, 6, 7], vec![8]];
        let l = TokenBatch::left_padded(&seqs, 0);
        assert_eq!(l.ids, vec![5, 6, 7, 0, 0, 8]);
        assert_eq!(l.mask, vec![true, true, true, false, false, true]);
        assert_eq!(l.positions(), vec![0, 1, 2, 0, 0, 0]);
        let r = TokenBatch::right_padded(&seqs, 0);
        assert_eq!(r.ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(r.positions(), vec![0, 1, 2, 0, 0, 0]);
    }

    #[test]
    fn mask_is_causal_skips_padding_and_keeps_the_diagonal() {
        // one row: [pad, a, b]
        let m = attention_mask(&[false, true, true], 1, 0, 3, 1);
        #[rustfmt::skip]
        let expect = vec![
            false, true, true,   // pad sees only itself
            true, false, true,   // a sees a
            true, false, false,  // b sees a, b
        ];
        assert_eq!(m, expect);
        // decode step: 1 query after 3 cached keys, 2 groups
        let m = attention_mask(&[false, true, true, true], 1, 3, 1, 2);
        assert_eq!(
            m,
            vec![true, false, false, false, true, false, false, false]
        );
    }

    #[test]
    fn rope_tables_repeat_frequencies() {
        let (cos, sin) = rope_tables(&[0, 3], 4, 10_000.0);
        assert_eq!(&cos[..4], &[1.0; 4]);
        assert_eq!(&sin[..4], &[0.0; 4]);
        assert!((cos[4] - 3f32.cos()).abs() < 1e-7);
        assert_eq!(cos[4], cos[6]);
        assert!((sin[5] - (3.0f32 * 0.01).sin()).abs() < 1e-7);
    }
}
