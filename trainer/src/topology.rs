//! Which part of which training domain each rank computes.
//!
//! With W ranks and K training domains:
//! - W >= K: rank r works on domain r mod K; the B images of a domain's per-step batch are split
//!   evenly over the ranks assigned to it, which form a sub-communicator (the *domain group*) used
//!   to assemble that domain's exact gradient.
//! - W < K: rank r holds the whole domains r, r+W, r+2W, ...

use anyhow::{bail, Result};
use mgrun_data::loader::ShardSpec;

#[derive(Debug, Clone, PartialEq)]
pub struct RankPlan {
    pub shards: Vec<ShardSpec>,
    /// With W >= K, the training domain this rank shares with its domain group (the colour of the
    /// group's `split`); `None` when the rank holds whole domains.
    pub domain_color: Option<usize>,
    /// Number of ranks that hold this rank's domain (1 when whole domains).
    pub ranks_per_domain: usize,
}

/// The plan of `rank` among `world` ranks; `train_domains[i]` is the dataset index of training
/// domain i, and `batch` the images per domain per step (B).
pub fn plan(rank: usize, world: usize, train_domains: &[usize], batch: usize) -> Result<RankPlan> {
    let k = train_domains.len();
    if k == 0 {
        bail!("no training domains: data.test_domains holds out every domain");
    }
    if rank >= world {
        bail!("rank {rank} out of range for world size {world}");
    }
    if world >= k {
        let e = rank % k;
        let group = (world - e).div_ceil(k);
        let position = rank / k;
        if batch < group {
            bail!(
                "data.batch_per_domain = {batch} is smaller than the {group} ranks sharing domain {e}; \
                 use fewer ranks or a larger batch"
            );
        }
        let lo = position * batch / group;
        let hi = (position + 1) * batch / group;
        Ok(RankPlan {
            shards: vec![ShardSpec { train_domain: e, domain: train_domains[e], lo, hi }],
            domain_color: Some(e),
            ranks_per_domain: group,
        })
    } else {
        let shards = (rank..k)
            .step_by(world)
            .map(|e| ShardSpec { train_domain: e, domain: train_domains[e], lo: 0, hi: batch })
            .collect();
        Ok(RankPlan { shards, domain_color: None, ranks_per_domain: 1 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (domain, image) of a step is computed by exactly one rank, for any world size.
    #[test]
    fn plans_cover_every_image_exactly_once() {
        let domains = [0, 2, 3];
        for batch in [5usize, 32] {
            for world in 1..=7 {
                let mut seen = vec![vec![0u32; batch]; domains.len()];
                for rank in 0..world {
                    let p = plan(rank, world, &domains, batch).unwrap();
                    for s in &p.shards {
                        assert_eq!(s.domain, domains[s.train_domain]);
                        for count in &mut seen[s.train_domain][s.lo..s.hi] {
                            *count += 1;
                        }
                    }
                }
                assert!(seen.iter().flatten().all(|&c| c == 1), "world {world} batch {batch}: {seen:?}");
            }
        }
    }

    #[test]
    fn fewer_ranks_than_domains_hold_whole_domains() {
        let p = plan(1, 2, &[0, 1, 2], 8).unwrap();
        assert_eq!(p.domain_color, None);
        assert_eq!(p.shards.len(), 1);
        assert_eq!((p.shards[0].train_domain, p.shards[0].lo, p.shards[0].hi), (1, 0, 8));
        let p0 = plan(0, 2, &[0, 1, 2], 8).unwrap();
        assert_eq!(p0.shards.iter().map(|s| s.train_domain).collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn more_ranks_than_domains_split_batches() {
        let p = plan(3, 4, &[0, 1, 2], 32).unwrap();
        assert_eq!(p.domain_color, Some(0));
        assert_eq!(p.ranks_per_domain, 2);
        assert_eq!((p.shards[0].lo, p.shards[0].hi), (16, 32));
    }

    #[test]
    fn batch_smaller_than_group_is_an_error() {
        let err = plan(0, 6, &[0, 1], 2).unwrap_err().to_string();
        assert!(err.contains("batch_per_domain"), "{err}");
    }
}
