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

/// [sum_e g_e; sum_e g_e^2] over the K training domains (2P values), the same on every rank. A rank
/// adds the domains it leads (possibly none), and one world all-reduce of the 2P values sums them,
/// unless every rank already holds every domain. One pass over P per domain held.
pub fn cross_domain_sums(grads: &DomainGradients, topology: &Topology<'_>, params: &Tensor) -> Result<Tensor> {
    let mut sums = Tensor::empty([2 * params.numel() as i64], (Kind::Float, params.device()));
    cross_domain_sums_into(grads, topology, &mut sums)?;
    Ok(sums)
}

/// [`cross_domain_sums`] written into `sums` (2P f32 values on the parameters' device), so that a
/// method can keep one buffer across steps instead of mapping fresh memory every step.
pub fn cross_domain_sums_into(grads: &DomainGradients, topology: &Topology<'_>, sums: &mut Tensor) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let numel = sums.numel() as i64 / 2;
    let (mut sum, mut sum_sq) = (sums.narrow(0, 0, numel), sums.narrow(0, numel, numel));
    let mut leaders = grads.domains.iter().filter(|d| d.leader);
    match leaders.next() {
        None => {
            let _ = sums.f_zero_()?;
        }
        Some(first) => {
            sum.f_copy_(&first.grad)?;
            let _ = first.grad.f_mul_out(&sum_sq, &first.grad)?;
        }
    }
    for domain in leaders {
        let _ = sum.f_add_(&domain.grad)?;
        let _ = sum_sq.f_addcmul_(&domain.grad, &domain.grad)?;
    }
    if !grads.replicated {
        all_reduce_grad(topology.world, sums, topology.bucket_bytes, "cross-domain gradient moments")?;
    }
    Ok(())
}

/// The moments from [`cross_domain_sums`]' `sums` over `num_domains` domains, with variance
/// denominator `denominator` (K - 1 unbiased, or K).
pub fn moments_of_sums(sums: &Tensor, num_domains: usize, denominator: f64) -> Result<CrossDomainMoments> {
    let _guard = tch::no_grad_guard();
    let numel = sums.numel() as i64 / 2;
    let k = num_domains as f64;
    let mean = sums.narrow(0, 0, numel) / k;
    let variance = ((sums.narrow(0, numel, numel) - &mean * &mean * k) / denominator).clamp_min(0.0);
    Ok(CrossDomainMoments { mean, variance })
}

/// The moments of `grads` for the flat parameters `params` (their size and device): see
/// [`cross_domain_sums`] and [`moments_of_sums`].
pub fn cross_domain_moments(
    grads: &DomainGradients,
    topology: &Topology<'_>,
    params: &Tensor,
    num_domains: usize,
    denominator: f64,
) -> Result<CrossDomainMoments> {
    moments_of_sums(&cross_domain_sums(grads, topology, params)?, num_domains, denominator)
}
