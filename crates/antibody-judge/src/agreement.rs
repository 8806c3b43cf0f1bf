//! How far a judge agrees with labels written by reading: the confusion matrix, the share
//! of agreement, Cohen's κ and per-class precision and recall.

use serde::{Deserialize, Serialize};

use crate::Label;

/// Per-class precision and recall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    /// The class.
    pub label: Label,
    /// Answers labelled with it.
    pub support: usize,
    /// Of the judge's calls of this class, the share that agree with the label (`None`
    /// when the judge never called it).
    pub precision: Option<f64>,
    /// Of the answers labelled so, the share the judge called so (`None` without support).
    pub recall: Option<f64>,
}

/// Agreement of a judge with the labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Answers compared.
    pub n: usize,
    /// `confusion[label][judged]`, in [`Label::ALL`] order.
    pub confusion: [[usize; 3]; 3],
    /// The share where the judge and the label agree.
    pub agreement: f64,
    /// Cohen's κ.
    pub kappa: f64,
    /// Per class, in [`Label::ALL`] order.
    pub classes: Vec<ClassScore>,
}

fn index(l: Label) -> usize {
    Label::ALL.iter().position(|&x| x == l).unwrap_or(0)
}

impl Agreement {
    /// Compares `(label, judged)` pairs.
    pub fn of(pairs: impl IntoIterator<Item = (Label, Label)>) -> Self {
        let mut confusion = [[0usize; 3]; 3];
        for (label, judged) in pairs {
            confusion[index(label)][index(judged)] += 1;
        }
        let n: usize = confusion.iter().flatten().sum();
        let agree: usize = (0..3).map(|i| confusion[i][i]).sum();
        let row = |i: usize| confusion[i].iter().sum::<usize>();
        let col = |j: usize| (0..3).map(|i| confusion[i][j]).sum::<usize>();
        let nf = n.max(1) as f64;
        let observed = agree as f64 / nf;
        let expected: f64 = (0..3)
            .map(|i| row(i) as f64 / nf * col(i) as f64 / nf)
            .sum();
        let kappa = if expected < 1.0 {
            (observed - expected) / (1.0 - expected)
        } else {
            1.0
        };
        let classes = Label::ALL
            .iter()
            .enumerate()
            .map(|(i, &label)| ClassScore {
                label,
                support: row(i),
                precision: (col(i) > 0).then(|| confusion[i][i] as f64 / col(i) as f64),
                recall: (row(i) > 0).then(|| confusion[i][i] as f64 / row(i) as f64),
            })
            .collect();
        Self {
            n,
            confusion,
            agreement: observed,
            kappa,
            classes,
        }
    }

    /// Answers labelled `label` that the judge called `judged`.
    pub fn count(&self, label: Label, judged: Label) -> usize {
        self.confusion[index(label)][index(judged)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Label::*;

    #[test]
    fn kappa_matches_a_hand_computed_table() {
        // Labels R R R C C C D D, judged R R C C C D D R:
        // agreement 5/8; row sums 3,3,2; column sums 3,3,2;
        // expected (9 + 9 + 4) / 64 = 22/64; kappa = (40/64 - 22/64) / (42/64) = 18/42.
        let pairs = [
            (Refused, Refused),
            (Refused, Refused),
            (Refused, Complied),
            (Complied, Complied),
            (Complied, Complied),
            (Complied, Degenerate),
            (Degenerate, Degenerate),
            (Degenerate, Refused),
        ];
        let a = Agreement::of(pairs);
        assert_eq!(a.n, 8);
        assert!((a.agreement - 5.0 / 8.0).abs() < 1e-12);
        assert!((a.kappa - 18.0 / 42.0).abs() < 1e-12, "{}", a.kappa);
        assert_eq!(a.count(Degenerate, Refused), 1);
        let r = &a.classes[0];
        assert_eq!(r.support, 3);
        assert_eq!(r.precision, Some(2.0 / 3.0));
        assert_eq!(r.recall, Some(2.0 / 3.0));
    }

    #[test]
    fn perfect_agreement_is_kappa_one() {
        let a = Agreement::of([(Refused, Refused), (Complied, Complied)]);
        assert_eq!(a.agreement, 1.0);
        assert_eq!(a.kappa, 1.0);
        assert_eq!(a.classes[2].precision, None);
    }
}
