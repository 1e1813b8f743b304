//! The per-domain in/out split.

use crate::sampler::{mix_seed, STREAM_SPLIT};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Splits the `n` files of dataset domain `domain` (in their sorted order) into `(in, out)` index lists.
///
/// Like DomainBed, the indices `0..n` are shuffled with a generator seeded from `(seed, domain)`, the first
/// `floor(n * holdout_fraction)` of the shuffled order form "out" and the rest "in"; both keep the shuffled
/// order. The shuffle is a ChaCha8 Fisher-Yates, not numpy's MT19937, so the membership differs from
/// DomainBed's: this function is the single place to swap for a numpy-exact port.
pub fn split_in_out(n: usize, holdout_fraction: f64, seed: u64, domain: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_SPLIT, seed, domain as u64]));
    order.shuffle(&mut rng);
    // Python's int(n * fraction): truncation of the same f64 product.
    let n_out = ((n as f64 * holdout_fraction) as usize).min(n);
    let in_split = order.split_off(n_out);
    (in_split, order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_disjointness_and_coverage() {
        for &(n, frac, n_out) in
            &[(100usize, 0.2, 20usize), (7, 0.2, 1), (4, 0.2, 0), (1, 0.5, 0), (10, 0.0, 0), (9, 0.34, 3)]
        {
            let (ins, outs) = split_in_out(n, frac, 0, 0);
            assert_eq!(outs.len(), n_out, "n={n} frac={frac}");
            assert_eq!(ins.len() + outs.len(), n);
            let mut all: Vec<usize> = ins.iter().chain(outs.iter()).copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..n).collect::<Vec<_>>(), "not a partition of 0..{n}");
        }
    }

    #[test]
    fn deterministic_and_seeded_per_domain() {
        let a = split_in_out(50, 0.2, 1, 0);
        assert_eq!(a, split_in_out(50, 0.2, 1, 0));
        assert_ne!(a.1, split_in_out(50, 0.2, 2, 0).1, "split_seed must change the split");
        assert_ne!(a.1, split_in_out(50, 0.2, 1, 1).1, "each domain gets its own shuffle");
        // Actually shuffled, not the identity order.
        assert_ne!(a.1, (0..10).collect::<Vec<_>>());
    }
}
