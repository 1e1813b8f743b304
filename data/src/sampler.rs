//! Per-step minibatch sampling as a pure function of integers, so that every rank, every world size and a
//! resumed run draw exactly the same images for a step.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Stream tags keep the random streams of different purposes independent for equal integer arguments.
pub(crate) const STREAM_SAMPLE: u64 = 0x5A4D_504C_0000_0001;
pub(crate) const STREAM_FLIP: u64 = 0x464C_4950_0000_0002;
// 0x5350_4C54_0000_0003 was the in/out split's stream; the split is now numpy's (split.rs).

/// SplitMix64 finaliser: a bijective, well-mixing map of 64-bit integers.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes a sequence of integers into one 64-bit seed (order matters).
pub fn mix_seed(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6D67_7275_6E00_0000, |h, &p| splitmix64(h ^ splitmix64(p)))
}

/// Indices (into `domain.in_split`, i.e. positions `0..n_in`) of the `batch` images that domain `domain`
/// (its index in the dataset, not among the training domains) contributes at `step`: uniform with
/// replacement, a pure function of `(seed, domain, step)`. Returns an empty vector when `n_in == 0`.
pub fn step_sample(seed: u64, domain: usize, step: u64, batch: usize, n_in: usize) -> Vec<usize> {
    if n_in == 0 {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_SAMPLE, seed, domain as u64, step]));
    // Drawn as u64 so that the sequence does not depend on the platform's pointer width.
    (0..batch).map(|_| rng.gen_range(0..n_in as u64) as usize).collect()
}

/// Whether image `position` (0..B, its place in the domain's whole per-step batch) of `domain` at `step` is
/// flipped horizontally. Independent of the rank and of the slice that loads it.
pub fn flip_decision(seed: u64, domain: usize, step: u64, position: usize) -> bool {
    mix_seed(&[STREAM_FLIP, seed, domain as u64, step, position as u64]) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_arguments_same_draw_and_values_in_range() {
        let a = step_sample(7, 2, 100, 64, 37);
        assert_eq!(a, step_sample(7, 2, 100, 64, 37));
        assert_eq!(a.len(), 64);
        assert!(a.iter().all(|&i| i < 37));
    }

    #[test]
    fn step_domain_and_seed_change_the_draw() {
        let base = step_sample(7, 2, 100, 32, 1000);
        assert_ne!(base, step_sample(7, 2, 101, 32, 1000));
        assert_ne!(base, step_sample(7, 3, 100, 32, 1000));
        assert_ne!(base, step_sample(8, 2, 100, 32, 1000));
    }

    #[test]
    fn a_larger_batch_extends_a_smaller_one() {
        // The sequence is a stream: the first B of a larger draw equal the draw of B.
        let small = step_sample(1, 0, 5, 16, 50);
        let large = step_sample(1, 0, 5, 32, 50);
        assert_eq!(&large[..16], &small[..]);
    }

    #[test]
    fn draws_with_replacement_and_roughly_uniform() {
        // 32 draws from 10 items must repeat (pigeonhole); over many steps every item is hit about equally.
        let draw = step_sample(3, 0, 0, 32, 10);
        let mut seen = draw.clone();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() < draw.len());
        let mut counts = [0usize; 10];
        for step in 0..1000 {
            for i in step_sample(3, 0, step, 32, 10) {
                counts[i] += 1;
            }
        }
        // 32000 draws, 3200 expected per item; the standard deviation is ~54.
        assert!(counts.iter().all(|&c| (2950..3450).contains(&c)), "{counts:?}");
    }

    #[test]
    fn empty_domain_gives_no_indices() {
        assert!(step_sample(0, 0, 0, 8, 0).is_empty());
    }

    #[test]
    fn flips_are_balanced_and_depend_on_position() {
        let flips: Vec<bool> = (0..2000).map(|p| flip_decision(0, 1, 3, p)).collect();
        let n = flips.iter().filter(|&&f| f).count();
        assert!((900..1100).contains(&n), "{n} flips of 2000");
        assert_eq!(flip_decision(0, 1, 3, 17), flip_decision(0, 1, 3, 17));
    }
}
