//! antibody-canary: the neurons that carried the new safety behaviour, and holding them in
//! place. Analysis never changes weights.
//!
//! - [`monitored_sites`]: the MLP hidden activation (`mlp.L`, intermediate width) and the
//!   attention output (`attn.L`, hidden width) of every layer.
//! - [`mean_activations`]: per-neuron mean activation over the real tokens of a prompt sample.
//! - [`drift`] `|A_post − A_pre|`, [`quantile`] (exact, linear interpolation as numpy and
//!   `torch.quantile`), [`select`]: canaries are the neurons whose drift exceeds quantile `q`
//!   of all drifts.
//! - [`canary_means`] (from the activations of the forward that computes `L_align`) and
//!   [`stab_loss`] `= MSE(A_current[canary], A_target)`.
//! - [`report`]: the per-cycle report, `canaries-*.json` and `canaries-*.parquet`.

pub mod report;

use std::collections::BTreeMap;

use antibody_model::{Hooks, Llama, ModelError, Site, TokenBatch};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// The canary targets of a model with `num_layers` layers: `attn.L` and `mlp.L` for every L.
pub fn monitored_sites(num_layers: usize) -> Vec<Site> {
    (0..num_layers)
        .flat_map(|l| [Site::attn_out(l), Site::mlp_hidden(l)])
        .collect()
}

/// Per-neuron mean activations per site over a prompt sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activations {
    /// Mean activation of each neuron, per site.
    pub means: BTreeMap<Site, Vec<f32>>,
    /// Real tokens averaged over.
    pub tokens: usize,
}

/// Mean activation of every neuron at `sites` over the real tokens of `batches`.
pub fn mean_activations<B: Backend>(
    model: &Llama<B>,
    batches: &[TokenBatch],
    sites: &[Site],
) -> Result<Activations, ModelError> {
    let mut sums: BTreeMap<Site, Vec<f64>> = BTreeMap::new();
    let mut tokens = 0usize;
    let device = model.device();
    for batch in batches {
        let out = model.forward_hidden(batch, &Hooks::capture(sites.iter().copied()))?;
        let mask: Vec<f32> = batch
            .mask
            .iter()
            .map(|&m| if m { 1.0 } else { 0.0 })
            .collect();
        tokens += batch.mask.iter().filter(|&&m| m).count();
        let mask =
            Tensor::<B, 3>::from_data(TensorData::new(mask, [batch.batch, batch.seq, 1]), &device);
        for site in sites {
            let act = out
                .sites
                .get(site)
                .ok_or_else(|| ModelError::Invalid(format!("site {site} was not captured")))?;
            let w = act.dims()[2];
            let summed: Vec<f32> = (act.clone() * mask.clone())
                .sum_dim(0)
                .sum_dim(1)
                .reshape([w])
                .into_data()
                .to_vec()
                .map_err(|e| ModelError::Invalid(format!("{e:?}")))?;
            let acc = sums.entry(*site).or_insert_with(|| vec![0.0; w]);
            for (a, s) in acc.iter_mut().zip(summed) {
                *a += f64::from(s);
            }
        }
    }
    let n = tokens.max(1) as f64;
    Ok(Activations {
        means: sums
            .into_iter()
            .map(|(s, v)| (s, v.into_iter().map(|x| (x / n) as f32).collect()))
            .collect(),
        tokens,
    })
}

/// `|post − pre|` per neuron divided by its site's scale, the root mean square of the site's
/// `pre` means: sites whose activations are large (attention outputs) and small (MLP hidden
/// activations) then compete for the quantile on equal terms. A site whose `pre` is all zero
/// keeps its absolute drift.
pub fn normalized_drift(pre: &Activations, post: &Activations) -> BTreeMap<Site, Vec<f32>> {
    drift(pre, post)
        .into_iter()
        .map(|(site, d)| {
            let a = &pre.means[&site];
            let ms =
                a.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / a.len().max(1) as f64;
            let rms = ms.sqrt();
            let scale = if rms > 0.0 { rms } else { 1.0 };
            (
                site,
                d.iter().map(|&x| (f64::from(x) / scale) as f32).collect(),
            )
        })
        .collect()
}

/// `|post − pre|` per neuron, for the sites both have.
pub fn drift(pre: &Activations, post: &Activations) -> BTreeMap<Site, Vec<f32>> {
    pre.means
        .iter()
        .filter_map(|(site, a)| {
            post.means
                .get(site)
                .map(|b| (*site, a.iter().zip(b).map(|(x, y)| (y - x).abs()).collect()))
        })
        .collect()
}

/// The exact `q` quantile of `values` with linear interpolation between order statistics
/// (numpy's default, `torch.quantile`'s default). `None` for no values or `q` outside [0, 1].
pub fn quantile(values: &[f32], q: f64) -> Option<f64> {
    if values.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut v: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    v.sort_by(f64::total_cmp);
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    Some(v[lo] + (v[hi] - v[lo]) * (pos - lo as f64))
}

/// The canaries: neuron indices per site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanarySet {
    /// The quantile used.
    pub q: f64,
    /// The drift threshold (quantile `q` of all drifts).
    pub threshold: f64,
    /// Canary neuron indices per site, ascending.
    pub neurons: BTreeMap<Site, Vec<usize>>,
}

impl CanarySet {
    /// Number of canaries.
    pub fn count(&self) -> usize {
        self.neurons.values().map(Vec::len).sum()
    }

    /// Canaries per layer.
    pub fn by_layer(&self) -> BTreeMap<usize, usize> {
        let mut out = BTreeMap::new();
        for (s, n) in &self.neurons {
            *out.entry(s.layer).or_default() += n.len();
        }
        out
    }

    /// The sites that have canaries.
    pub fn sites(&self) -> Vec<Site> {
        self.neurons
            .iter()
            .filter(|(_, n)| !n.is_empty())
            .map(|(s, _)| *s)
            .collect()
    }

    /// The canaries' values in `activations`, concatenated in site order (`A_target`).
    pub fn values(&self, activations: &Activations) -> Vec<f32> {
        self.neurons
            .iter()
            .flat_map(|(s, idx)| {
                let means = activations.means.get(s);
                idx.iter()
                    .map(move |&i| means.and_then(|m| m.get(i).copied()).unwrap_or(0.0))
            })
            .collect()
    }
}

/// Selects the neurons whose drift exceeds quantile `q` of all drifts.
pub fn select(drift: &BTreeMap<Site, Vec<f32>>, q: f64) -> CanarySet {
    let all: Vec<f32> = drift.values().flatten().copied().collect();
    let threshold = quantile(&all, q).unwrap_or(f64::INFINITY);
    let neurons = drift
        .iter()
        .map(|(s, d)| {
            (
                *s,
                d.iter()
                    .enumerate()
                    .filter(|(_, x)| f64::from(**x) > threshold)
                    .map(|(i, _)| i)
                    .collect(),
            )
        })
        .collect();
    CanarySet {
        q,
        threshold,
        neurons,
    }
}

/// `A_current`: the batch mean of each canary's activation over counted tokens, concatenated
/// in site order `[K]`, from activations `[b, t, w]` captured by the forward that computes
/// `L_align` (`mask` `[b, t]`: 1 on real tokens).
pub fn canary_means<B: Backend>(
    sites: &BTreeMap<Site, Tensor<B, 3>>,
    mask: Tensor<B, 2>,
    set: &CanarySet,
) -> Result<Tensor<B, 1>, ModelError> {
    let [b, t] = mask.dims();
    let count = mask.clone().sum().clamp_min(1.0);
    let mask = mask.reshape([b, t, 1]);
    let mut parts = Vec::new();
    for (site, idx) in set.neurons.iter().filter(|(_, i)| !i.is_empty()) {
        let act = sites
            .get(site)
            .ok_or_else(|| ModelError::Invalid(format!("canary site {site} was not captured")))?;
        let device = act.device();
        let ids: Vec<i64> = idx.iter().map(|&i| i as i64).collect();
        let k = ids.len();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [k]), &device);
        let picked = act.clone().select(2, index) * mask.clone();
        parts.push(picked.sum_dim(0).sum_dim(1).reshape([k]) / count.clone());
    }
    if parts.is_empty() {
        return Err(ModelError::Invalid("the canary set is empty".into()));
    }
    Ok(Tensor::cat(parts, 0))
}

/// `L_stab = mean_k (current_k − target_k)²`.
pub fn stab_loss<B: Backend>(current: Tensor<B, 1>, target: &[f32]) -> Tensor<B, 1> {
    let device = current.device();
    let target =
        Tensor::<B, 1>::from_data(TensorData::new(target.to_vec(), [target.len()]), &device);
    (current - target).square().mean()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_interpolates_like_numpy() {
        // numpy.quantile([1, 2, 3, 4], 0.5) = 2.5; q=0.99 of 0..=100 is 99.0.
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), Some(2.5));
        let v: Vec<f32> = (0..=100).map(|x| x as f32).collect();
        assert!((quantile(&v, 0.99).unwrap_or(0.0) - 99.0).abs() < 1e-9);
        assert_eq!(quantile(&[7.0], 0.3), Some(7.0));
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[1.0], 1.5), None);
    }

    #[test]
    fn selection_takes_drifts_above_the_threshold() {
        let mut d = BTreeMap::new();
        d.insert(Site::attn_out(0), vec![0.0, 0.1, 5.0]);
        d.insert(Site::mlp_hidden(1), vec![0.2, 9.0, 0.3, 0.0]);
        let set = select(&d, 0.75);
        assert_eq!(set.neurons[&Site::attn_out(0)], vec![2]);
        assert_eq!(set.neurons[&Site::mlp_hidden(1)], vec![1]);
        assert_eq!(set.count(), 2);
        assert_eq!(set.by_layer(), BTreeMap::from([(0, 1), (1, 1)]));
    }
}
