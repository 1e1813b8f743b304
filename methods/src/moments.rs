//! Cross-domain moments of per-domain gradients: the statistics that DSP-Reg (and Fishr-like
//! methods) build on, computed once for every method that needs them.

use crate::common::all_reduce_grad;
use crate::gradients::DomainGradients;
use crate::Topology;
use anyhow::Result;
use tch::{Kind, Tensor};

/// Per scalar parameter, over the K training domains' gradients g_e.
pub struct CrossDomainMoments {
    /// m = (1/K) sum_e g_e (the ERM gradient).
    pub mean: Tensor,
    /// v = (sum_e g_e^2 - K m^2) / denominator, clamped at 0 against rounding.
    pub variance: Tensor,
}

/// The moments of `grads` over `num_domains` domains with variance denominator `denominator`
/// (K - 1 unbiased, or K), for the flat parameters `params` (their size and device). A rank adds
/// [g_e; g_e^2] for the domains it leads (possibly none), and one world all-reduce of those 2P
/// values sums them, unless every rank already holds every domain.
pub fn cross_domain_moments(
    grads: &DomainGradients,
    topology: &Topology<'_>,
    params: &Tensor,
    num_domains: usize,
    denominator: f64,
) -> Result<CrossDomainMoments> {
    let _guard = tch::no_grad_guard();
    let numel = params.numel() as i64;
    let k = num_domains as f64;
    let mut sums = Tensor::zeros([2 * numel], (Kind::Float, params.device()));
    for domain in grads.domains.iter().filter(|d| d.leader) {
        let _ = sums.narrow(0, 0, numel).f_add_(&domain.grad)?;
        let _ = sums.narrow(0, numel, numel).f_add_(&(&domain.grad * &domain.grad))?;
    }
    if !grads.replicated {
        all_reduce_grad(topology.world, &mut sums, topology.bucket_bytes, "cross-domain gradient moments")?;
    }
    let mean = sums.narrow(0, 0, numel) / k;
    let variance = ((sums.narrow(0, numel, numel) - &mean * &mean * k) / denominator).clamp_min(0.0);
    Ok(CrossDomainMoments { mean, variance })
}
