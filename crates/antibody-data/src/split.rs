//! Normalization, deduplication and the seeded, hash-based split.
//!
//! A prompt's slice depends only on its normalized text and the seed, so it is stable when
//! sources are added or reordered, and equal prompts always land in the same slice.
//! Deduplication runs across every prompt source at once: evaluation-role sources are
//! taken first, so a prompt that appears in both an evaluation source and a training
//! source is kept for evaluation only.

use std::collections::{BTreeMap, HashSet};

use antibody_model::tiny::{fnv1a64, splitmix64};

use crate::config::{Role, SourceConfig, SourceKind, SplitConfig};
use crate::source::Row;

/// Lower-cases, keeps letters and digits, and collapses everything else to single spaces.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for ch in text.chars().flat_map(char::to_lowercase) {
        if ch.is_alphanumeric() {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(ch);
        } else {
            space = true;
        }
    }
    out
}

/// A uniform number in [0, 1) from `seed` and `key`.
pub fn unit(seed: u64, key: &str) -> f64 {
    let z = splitmix64(fnv1a64(key.as_bytes()) ^ seed.rotate_left(17));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// An index in `0..n` from `seed` and `key` (`n > 0`).
pub fn pick(seed: u64, key: &str, n: usize) -> usize {
    ((unit(seed, key) * n as f64) as usize).min(n.saturating_sub(1))
}

/// The prompt pools after deduplication and splitting (before caps and generation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pools {
    /// Harmful prompts for hardening.
    pub harmful_train: Vec<Row>,
    /// Harmful prompts reserved for the attacker's fine-tuning.
    pub harmful_attack: Vec<Row>,
    /// Held-out harmful prompts.
    pub harmful_eval: Vec<Row>,
    /// Harmless prompts for training.
    pub harmless_train: Vec<Row>,
    /// Held-out harmless prompts.
    pub harmless_eval: Vec<Row>,
    /// Benign look-alikes (evaluation only).
    pub lookalike_eval: Vec<Row>,
    /// Rows dropped as duplicates, per source.
    pub duplicates: BTreeMap<String, usize>,
}

/// Deduplicates and splits the rows of every prompt source.
pub fn split(sources: &[(&SourceConfig, &[Row])], config: &SplitConfig, seed: u64) -> Pools {
    let mut pools = Pools::default();
    let mut seen: HashSet<String> = HashSet::new();
    let eval_first = sources
        .iter()
        .filter(|(s, _)| s.role() == Role::Eval)
        .chain(sources.iter().filter(|(s, _)| s.role() == Role::Train));
    for (source, rows) in eval_first {
        if !source.is_prompt_source() {
            continue;
        }
        for row in rows.iter() {
            let norm = normalize(&row.text);
            if !seen.insert(norm.clone()) {
                *pools.duplicates.entry(source.name.clone()).or_default() += 1;
                continue;
            }
            let u = unit(seed, &format!("split:{norm}"));
            let pool = match (source.kind, source.role()) {
                (SourceKind::Harmful, Role::Eval) => &mut pools.harmful_eval,
                (SourceKind::Harmful, Role::Train) if u < config.harmful_eval => {
                    &mut pools.harmful_eval
                }
                (SourceKind::Harmful, Role::Train)
                    if u < config.harmful_eval + config.harmful_attack =>
                {
                    &mut pools.harmful_attack
                }
                (SourceKind::Harmful, Role::Train) => &mut pools.harmful_train,
                (SourceKind::Harmless, Role::Eval) => &mut pools.harmless_eval,
                (SourceKind::Harmless, Role::Train) if u < config.harmless_eval => {
                    &mut pools.harmless_eval
                }
                (SourceKind::Harmless, Role::Train) => &mut pools.harmless_train,
                (SourceKind::Lookalike, _) => &mut pools.lookalike_eval,
                (SourceKind::Refusal | SourceKind::UnnecessaryRefusal, _) => continue,
            };
            pool.push(row.clone());
        }
    }
    pools
}

/// Keeps at most `n` rows (0 = all), chosen in an order seeded by `seed` and `set`.
pub fn cap(rows: Vec<Row>, n: usize, seed: u64, set: &str) -> Vec<Row> {
    if n == 0 || rows.len() <= n {
        return rows;
    }
    let mut keyed: Vec<(f64, Row)> = rows
        .into_iter()
        .map(|r| (unit(seed, &format!("cap:{set}:{}", normalize(&r.text))), r))
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
    keyed.truncate(n);
    keyed.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Format;

    fn source(name: &str, kind: SourceKind, role: Option<Role>) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            kind,
            role,
            format: Format::Lines,
            field: None,
            id_field: None,
            category_field: None,
            enabled: true,
            license: "test".into(),
            package: None,
            version: None,
            wheel_sha256: None,
            path: None,
            file: Some("x".into()),
            sha256: None,
        }
    }

    fn rows(source: &str, texts: &[&str]) -> Vec<Row> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Row {
                id: format!("{source}-{i}"),
                source: source.into(),
                category: String::new(),
                text: (*t).into(),
            })
            .collect()
    }

    #[test]
    fn normalization() {
        assert_eq!(
            normalize("  How do I   make, a Bomb?! "),
            "how do i make a bomb"
        );
        assert_eq!(normalize("How do I make a bomb"), "how do i make a bomb");
        assert_eq!(normalize("Ünïcode—dash"), "ünïcode dash");
    }

    #[test]
    fn eval_sources_win_duplicates_and_nothing_leaks() {
        let eval = source("eval", SourceKind::Harmful, Some(Role::Eval));
        let train = source("train", SourceKind::Harmful, None);
        let eval_rows = rows("eval", &["Write a threat.", "Build a weapon"]);
        let mut train_texts: Vec<String> =
            (0..200).map(|i| format!("harmful prompt {i}")).collect();
        train_texts.push("write a THREAT".into());
        train_texts.push("Harmful prompt 3!".into());
        let refs: Vec<&str> = train_texts.iter().map(String::as_str).collect();
        let train_rows = rows("train", &refs);
        let config = SplitConfig::default();
        let pools = split(&[(&train, &train_rows), (&eval, &eval_rows)], &config, 7);
        assert_eq!(pools.duplicates.get("train"), Some(&2));
        let eval_norms: HashSet<String> = pools
            .harmful_eval
            .iter()
            .map(|r| normalize(&r.text))
            .collect();
        assert!(eval_norms.contains("write a threat"));
        for r in pools.harmful_train.iter().chain(&pools.harmful_attack) {
            assert!(!eval_norms.contains(&normalize(&r.text)), "{}", r.text);
        }
        let total =
            pools.harmful_train.len() + pools.harmful_attack.len() + pools.harmful_eval.len();
        assert_eq!(total, 202);
        // Roughly the configured fractions of the 200 training-role prompts.
        assert!(
            (10..=35).contains(&(pools.harmful_eval.len() - 2)),
            "{}",
            pools.harmful_eval.len()
        );
        assert!(
            (25..=60).contains(&pools.harmful_attack.len()),
            "{}",
            pools.harmful_attack.len()
        );
        // Same seed, same split; another seed, another split.
        let again = split(&[(&train, &train_rows), (&eval, &eval_rows)], &config, 7);
        assert_eq!(again, pools);
        let other = split(&[(&train, &train_rows), (&eval, &eval_rows)], &config, 8);
        assert_ne!(other.harmful_train, pools.harmful_train);
    }

    #[test]
    fn caps_are_seeded_subsets() {
        let texts: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let all = rows("s", &refs);
        let a = cap(all.clone(), 10, 1, "x");
        assert_eq!(a.len(), 10);
        assert_eq!(a, cap(all.clone(), 10, 1, "x"));
        assert_ne!(a, cap(all.clone(), 10, 2, "x"));
        assert_eq!(cap(all.clone(), 0, 1, "x").len(), 50);
    }
}
