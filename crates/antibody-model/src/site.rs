//! Named activation sites, the hooks that read and perturb them, and the forward's output.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// What is measured at a site of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SiteKind {
    /// The residual stream after the whole layer (width = hidden size).
    Residual,
    /// The attention block's output, after `o_proj` and before the residual add (hidden size).
    AttnOut,
    /// The MLP hidden activation `silu(gate)·up`, the input of `down_proj` (intermediate size).
    MlpHidden,
}

impl SiteKind {
    fn prefix(self) -> &'static str {
        match self {
            SiteKind::Residual => "resid",
            SiteKind::AttnOut => "attn",
            SiteKind::MlpHidden => "mlp",
        }
    }
}

/// A named activation site: `resid.L`, `attn.L` or `mlp.L` for decoder layer `L` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Site {
    /// Decoder layer index, from 0.
    pub layer: usize,
    /// Which activation of that layer.
    pub kind: SiteKind,
}

impl Site {
    /// The residual stream after layer `layer`.
    pub fn residual(layer: usize) -> Self {
        Self {
            layer,
            kind: SiteKind::Residual,
        }
    }
    /// The attention output of layer `layer`.
    pub fn attn_out(layer: usize) -> Self {
        Self {
            layer,
            kind: SiteKind::AttnOut,
        }
    }
    /// The MLP hidden activation of layer `layer`.
    pub fn mlp_hidden(layer: usize) -> Self {
        Self {
            layer,
            kind: SiteKind::MlpHidden,
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.kind.prefix(), self.layer)
    }
}

impl FromStr for Site {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ModelError::Invalid(format!(
                "bad site `{s}`: expected resid.L, attn.L or mlp.L with L a layer index"
            ))
        };
        let (prefix, layer) = s.split_once('.').ok_or_else(bad)?;
        let kind = match prefix {
            "resid" => SiteKind::Residual,
            "attn" => SiteKind::AttnOut,
            "mlp" => SiteKind::MlpHidden,
            _ => return Err(bad()),
        };
        let layer = layer.parse().map_err(|_| bad())?;
        Ok(Self { layer, kind })
    }
}

impl TryFrom<String> for Site {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Site> for String {
    fn from(s: Site) -> Self {
        s.to_string()
    }
}

/// What a forward pass should read out and add in.
///
/// Perturbations are added at their site (any kind) with gradients flowing to them, so a
/// leaf tensor marked `require_grad` yields `∂loss/∂δ` after `backward` (what LAT needs).
#[derive(Debug, Clone)]
pub struct Hooks<B: Backend> {
    /// Sites whose activations are returned in [`ForwardOutput::sites`].
    pub capture: BTreeSet<Site>,
    /// Tensors added at sites, each `[batch, seq, width]` (width = hidden or intermediate size).
    pub perturb: BTreeMap<Site, Tensor<B, 3>>,
}

impl<B: Backend> Default for Hooks<B> {
    fn default() -> Self {
        Self {
            capture: BTreeSet::new(),
            perturb: BTreeMap::new(),
        }
    }
}

impl<B: Backend> Hooks<B> {
    /// No reads, no perturbations.
    pub fn none() -> Self {
        Self::default()
    }
    /// Reads the given sites.
    pub fn capture(sites: impl IntoIterator<Item = Site>) -> Self {
        Self {
            capture: sites.into_iter().collect(),
            perturb: BTreeMap::new(),
        }
    }
    /// Adds `delta` at `site`.
    pub fn with_perturbation(mut self, site: Site, delta: Tensor<B, 3>) -> Self {
        self.perturb.insert(site, delta);
        self
    }
    /// The highest layer any hook touches.
    pub fn max_layer(&self) -> Option<usize> {
        self.capture
            .iter()
            .chain(self.perturb.keys())
            .map(|s| s.layer)
            .max()
    }
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput<B: Backend> {
    /// The final hidden states after the last RMSNorm, `[batch, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// The captured activations, `[batch, seq, width]` each.
    pub sites: BTreeMap<Site, Tensor<B, 3>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_roundtrip_through_their_names() {
        for s in [Site::residual(12), Site::attn_out(0), Site::mlp_hidden(29)] {
            assert_eq!(s.to_string().parse::<Site>().expect("parse"), s);
        }
        assert_eq!(Site::residual(3).to_string(), "resid.3");
        let err = "resid".parse::<Site>().expect_err("no layer").to_string();
        assert!(err.contains("resid.L"), "{err}");
        assert!("mlp.x".parse::<Site>().is_err());
        assert!("norm.1".parse::<Site>().is_err());
    }
}
