//! The per-domain in/out split, bit for bit DomainBed's (`domainbed/scripts/train.py` + `lib/misc.py`).

use mgrun_nprand::{seed_hash, PyArg, RandomState};

/// DomainBed's split seed of environment `env_index` in trial `trial_seed`: `misc.seed_hash(trial_seed, env_i)`.
pub fn split_seed_hash(trial_seed: u64, env_index: usize) -> u32 {
    // Python ints are unbounded; trial seeds and environment indices are small, so i64 prints the same.
    seed_hash(&[PyArg::Int(trial_seed as i64), PyArg::Int(env_index as i64)])
}

/// Splits the `n` files of environment `env_index` (in `ImageFolder` order) into `(in, out)` index lists.
///
/// DomainBed: `out, in_ = split_dataset(env, int(len(env) * holdout_fraction), seed_hash(trial_seed, env_i))`
/// where `split_dataset` shuffles `list(range(n))` with `np.random.RandomState(seed).shuffle` and takes the
/// first `n_out` keys as "out", the rest as "in"; both keep the shuffled order (the index order of
/// DomainBed's `_SplitDataset`). Training and the reported test accuracy use "in".
pub fn split_in_out(n: usize, holdout_fraction: f64, trial_seed: u64, env_index: usize) -> (Vec<usize>, Vec<usize>) {
    let mut keys: Vec<usize> = (0..n).collect();
    RandomState::new(split_seed_hash(trial_seed, env_index)).shuffle(&mut keys);
    // Python's int(n * fraction): truncation of the same f64 product.
    let n_out = ((n as f64 * holdout_fraction) as usize).min(n);
    let in_split = keys.split_off(n_out);
    (in_split, keys)
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
    fn seed_hash_of_python_tuple_text() {
        // hashlib.md5(str((0, 1)).encode()).hexdigest() mod 2**31, computed with Python.
        assert_eq!(split_seed_hash(0, 1), 1_514_274_641);
        assert_eq!(split_seed_hash(0, 0), 894_182_419);
    }

    #[test]
    fn known_numpy_split() {
        // np.random.RandomState(seed_hash(0, 0)).shuffle(keys := list(range(10))); out = keys[:2].
        let (ins, outs) = split_in_out(10, 0.2, 0, 0);
        let mut keys: Vec<usize> = (0..10).collect();
        RandomState::new(894_182_419).shuffle(&mut keys);
        assert_eq!(outs, keys[..2]);
        assert_eq!(ins, keys[2..]);
        assert_ne!(split_in_out(50, 0.2, 1, 0).1, split_in_out(50, 0.2, 2, 0).1, "trial seed changes the split");
        assert_ne!(split_in_out(50, 0.2, 1, 0).1, split_in_out(50, 0.2, 1, 1).1, "each environment differs");
    }
}
