//! Rates with their uncertainty, and samples that represent their set.
//!
//! - [`Rate`]: `k` of `n` with its Wilson 95% score interval (Wilson, 1927), the interval
//!   that keeps its coverage near 0 and 1 and at small `n`, where the normal approximation
//!   does not;
//! - [`PairedDifference`]: the difference of two rates measured on the same prompts, with
//!   Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10);
//! - [`stratified_sample`]: a seeded random sample, allocated to the strata (categories) in
//!   proportion to their size — never the first rows of a file.

use serde::{Deserialize, Serialize};

use crate::hash::splitmix64;

/// The 0.975 quantile of the standard normal distribution.
pub const Z95: f64 = 1.959_963_984_540_054;

/// A share `k / n` with its Wilson 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Successes.
    pub k: usize,
    /// Trials.
    pub n: usize,
    /// `k / n` (0 when `n` is 0).
    pub rate: f64,
    /// Lower end of the 95% interval.
    pub lo: f64,
    /// Upper end of the 95% interval.
    pub hi: f64,
}

impl Rate {
    /// `k` of `n`.
    pub fn new(k: usize, n: usize) -> Self {
        let (lo, hi) = wilson(k, n);
        Self {
            k,
            n,
            rate: if n == 0 { 0.0 } else { k as f64 / n as f64 },
            lo,
            hi,
        }
    }

    /// The share of `true` in `xs`.
    pub fn of(xs: impl IntoIterator<Item = bool>) -> Self {
        let (mut k, mut n) = (0, 0);
        for x in xs {
            n += 1;
            k += usize::from(x);
        }
        Self::new(k, n)
    }

    /// "41.5% [34.9, 48.4]".
    pub fn interval_percent(&self) -> String {
        format!(
            "{:.1}% [{:.1}, {:.1}]",
            100.0 * self.rate,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }

    /// "41.5% [34.9, 48.4] (n=200)".
    pub fn display_percent(&self) -> String {
        format!("{} (n={})", self.interval_percent(), self.n)
    }
}

/// The Wilson 95% score interval of `k` successes in `n` trials (`(0, 1)` when `n` is 0).
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// `rate(a) − rate(b)` over the same items, with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// Items (pairs).
    pub n: usize,
    /// The difference of the two shares.
    pub diff: f64,
    /// Lower end of the 95% interval.
    pub lo: f64,
    /// Upper end of the 95% interval.
    pub hi: f64,
}

impl PairedDifference {
    /// The difference of the shares of `true` in `a` and in `b`, item by item (`None` when
    /// the lengths differ).
    pub fn of(a: &[bool], b: &[bool]) -> Option<Self> {
        if a.len() != b.len() {
            return None;
        }
        let (mut both, mut only_a, mut only_b, mut neither) = (0usize, 0usize, 0usize, 0usize);
        for (&x, &y) in a.iter().zip(b) {
            match (x, y) {
                (true, true) => both += 1,
                (true, false) => only_a += 1,
                (false, true) => only_b += 1,
                (false, false) => neither += 1,
            }
        }
        Some(newcombe_paired(both, only_a, only_b, neither))
    }
}

/// Newcombe's method 10 for the 2×2 table of paired outcomes: `both` (1, 1), `only_a`
/// (1, 0), `only_b` (0, 1), `neither` (0, 0).
pub fn newcombe_paired(
    both: usize,
    only_a: usize,
    only_b: usize,
    neither: usize,
) -> PairedDifference {
    let n = both + only_a + only_b + neither;
    if n == 0 {
        return PairedDifference {
            n,
            diff: 0.0,
            lo: -1.0,
            hi: 1.0,
        };
    }
    let nf = n as f64;
    let (p1, p2) = ((both + only_a) as f64 / nf, (both + only_b) as f64 / nf);
    let (l1, u1) = wilson(both + only_a, n);
    let (l2, u2) = wilson(both + only_b, n);
    let (a, b, c, d) = (both as f64, only_a as f64, only_b as f64, neither as f64);
    let denom = ((a + b) * (c + d) * (a + c) * (b + d)).sqrt();
    let phi = if denom > 0.0 {
        (a * d - b * c) / denom
    } else {
        0.0
    };
    let diff = p1 - p2;
    let delta = ((p1 - l1).powi(2) - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2).powi(2))
        .max(0.0)
        .sqrt();
    let eps = ((u1 - p1).powi(2) - 2.0 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2).powi(2))
        .max(0.0)
        .sqrt();
    PairedDifference {
        n,
        diff,
        lo: (diff - delta).max(-1.0),
        hi: (diff + eps).min(1.0),
    }
}

/// A seeded sample of `n` of the items whose strata are `strata` (all of them when `n` is 0
/// or at least their number), allocated to the strata in proportion to their sizes (largest
/// remainders; every stratum with items keeps at least one when `n` allows), drawn at random
/// within each stratum. Returns indices in ascending order.
pub fn stratified_sample<S: AsRef<str>>(strata: &[S], n: usize, seed: u64) -> Vec<usize> {
    let total = strata.len();
    if n == 0 || n >= total {
        return (0..total).collect();
    }
    let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, s) in strata.iter().enumerate() {
        groups.entry(s.as_ref()).or_default().push(i);
    }
    // Proportional quotas, then the remainders by size of their fraction.
    let mut quotas: Vec<(usize, f64, &str)> = groups
        .iter()
        .map(|(k, v)| {
            let exact = n as f64 * v.len() as f64 / total as f64;
            (exact.floor() as usize, exact - exact.floor(), *k)
        })
        .collect();
    if n >= groups.len() {
        for q in &mut quotas {
            if q.0 == 0 {
                q.0 = 1;
                q.1 = 0.0;
            }
        }
    }
    let mut assigned: usize = quotas.iter().map(|q| q.0).sum();
    let mut order: Vec<usize> = (0..quotas.len()).collect();
    order.sort_by(|&a, &b| quotas[b].1.total_cmp(&quotas[a].1).then(a.cmp(&b)));
    let mut i = 0;
    while assigned < n && !order.is_empty() {
        let q = &mut quotas[order[i % order.len()]];
        if q.0 < groups[q.2].len() {
            q.0 += 1;
            assigned += 1;
        }
        i += 1;
    }
    while assigned > n {
        // The floor of one per stratum overshot: take back from the largest quotas.
        if let Some(q) = quotas.iter_mut().filter(|q| q.0 > 1).max_by_key(|q| q.0) {
            q.0 -= 1;
            assigned -= 1;
        } else {
            break;
        }
    }
    let mut out = Vec::with_capacity(n);
    for (g, (quota, _, key)) in quotas.iter().enumerate() {
        let mut members = groups[key].clone();
        // A seeded Fisher–Yates shuffle per stratum.
        let mut state = splitmix64(seed ^ splitmix64(g as u64 + 1));
        for j in (1..members.len()).rev() {
            state = splitmix64(state);
            members.swap(j, (state % (j as u64 + 1)) as usize);
        }
        out.extend(members.into_iter().take(*quota));
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_statsmodels() {
        // statsmodels 0.14 `proportion_confint(k, n, method="wilson")`.
        for (k, n, lo, hi) in [
            (28, 48, 0.442_813_322_839_762_8, 0.711_503_322_215_884_4),
            (0, 200, 0.0, 0.018_845_326_377_266_58),
            (200, 200, 0.981_154_673_622_733_5, 1.0),
            (7, 10, 0.396_778_147_461_145_37, 0.892_208_732_593_698_9),
        ] {
            let (l, h) = wilson(k, n);
            assert!(
                (l - lo).abs() < 1e-12 && (h - hi).abs() < 1e-12,
                "{k}/{n}: {l} {h}"
            );
        }
        assert_eq!(wilson(0, 0), (0.0, 1.0));
        let r = Rate::new(28, 48);
        assert_eq!(r.display_percent(), "58.3% [44.3, 71.2] (n=48)");
    }

    #[test]
    fn paired_difference_approaches_the_wald_interval_at_large_n() {
        // At large n the score interval and the Wald interval of the paired difference,
        // (b − c)/n ± z·sqrt((b + c)/n − ((b − c)/n)²)/sqrt(n), agree closely.
        let (a, b, c, d) = (1200usize, 900usize, 500usize, 1400usize);
        let n = (a + b + c + d) as f64;
        let diff = (b as f64 - c as f64) / n;
        let se = (((b + c) as f64 / n - diff * diff) / n).sqrt();
        let p = newcombe_paired(a, b, c, d);
        assert!((p.diff - diff).abs() < 1e-12);
        assert!(
            (p.lo - (diff - Z95 * se)).abs() < 2e-3,
            "{} vs {}",
            p.lo,
            diff - Z95 * se
        );
        assert!(
            (p.hi - (diff + Z95 * se)).abs() < 2e-3,
            "{} vs {}",
            p.hi,
            diff + Z95 * se
        );
        // Swapping the two models mirrors the interval.
        let q = newcombe_paired(a, c, b, d);
        assert!((q.lo + p.hi).abs() < 1e-12 && (q.hi + p.lo).abs() < 1e-12);
        // Small n: the interval holds the estimate and stays inside [−1, 1].
        let s = newcombe_paired(8, 5, 4, 9);
        assert!((s.diff - 1.0 / 26.0).abs() < 1e-12);
        assert!(-1.0 <= s.lo && s.lo < s.diff && s.diff < s.hi && s.hi <= 1.0);
        let same = PairedDifference::of(&[true, false, true], &[true, false, true])
            .expect("equal lengths");
        assert_eq!(same.diff, 0.0);
        assert!(PairedDifference::of(&[true], &[]).is_none());
    }

    #[test]
    fn a_stratified_sample_is_seeded_proportional_and_not_the_first_rows() {
        let strata: Vec<&str> = (0..100)
            .map(|i| {
                if i < 60 {
                    "a"
                } else if i < 90 {
                    "b"
                } else {
                    "c"
                }
            })
            .collect();
        let s = stratified_sample(&strata, 20, 7);
        assert_eq!(s.len(), 20);
        assert_eq!(s, stratified_sample(&strata, 20, 7), "seeded");
        assert_ne!(s, stratified_sample(&strata, 20, 8));
        let count = |k: &str| s.iter().filter(|&&i| strata[i] == k).count();
        assert_eq!((count("a"), count("b"), count("c")), (12, 6, 2));
        assert_ne!(s, (0..20).collect::<Vec<_>>());
        assert_eq!(stratified_sample(&strata, 0, 7).len(), 100);
        // Every stratum keeps one when n allows, and the total stays n.
        let skewed: Vec<&str> = (0..100).map(|i| if i < 98 { "x" } else { "y" }).collect();
        let s = stratified_sample(&skewed, 10, 1);
        assert_eq!(s.len(), 10);
        assert!(s.iter().any(|&i| skewed[i] == "y"));
    }
}
