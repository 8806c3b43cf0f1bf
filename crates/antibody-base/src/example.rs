//! [`Example`]: one training or scoring sequence, `prompt ++ response` token ids with the mask
//! of its response tokens — what a data build's records give (`Record::sequence`), what the
//! losses shift into next-token targets and what every fine-tuning loop consumes.

use serde::{Deserialize, Serialize};

/// A token sequence and which of its tokens belong to the response (the tokens a loss counts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// Token ids, prompt then response.
    pub ids: Vec<u32>,
    /// `true` at the response's tokens (same length as `ids`).
    pub response_mask: Vec<bool>,
}

impl Example {
    /// `prompt ++ response`, the mask set on the response.
    pub fn from_parts(prompt: &[u32], response: &[u32]) -> Self {
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(response);
        let mut response_mask = vec![false; prompt.len()];
        response_mask.resize(ids.len(), true);
        Self { ids, response_mask }
    }

    /// Tokens in all.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl From<(Vec<u32>, Vec<bool>)> for Example {
    fn from((ids, response_mask): (Vec<u32>, Vec<bool>)) -> Self {
        Self { ids, response_mask }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_mark_the_response() {
        let e = Example::from_parts(&[1, 2], &[3]);
        assert_eq!(e.ids, vec![1, 2, 3]);
        assert_eq!(e.response_mask, vec![false, false, true]);
        assert_eq!(e.len(), 3);
    }
}
