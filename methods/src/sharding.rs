//! Which images of each step every rank computes: the *sharding plan*.
//!
//! A step's batch is K training domains x B images, laid out domain after domain. The plan cuts it
//! into *units* (one image on the fast path; `train.micro_batch` images in deterministic mode, the
//! last unit of a domain possibly shorter) and gives rank r the contiguous run of units
//! `[r N / W, (r+1) N / W)` of the N units: every rank computes ⌊N/W⌋ or ⌈N/W⌉ units, whatever W and
//! K. A rank's run falls into *pieces*, one per domain it touches, in domain order.
//!
//! A domain whose images lie on several ranks is *split*; methods that need a domain's exact gradient
//! (DSP-Reg's g_e², per-domain SAM) sum its pieces within a *domain group*, a sub-communicator of the
//! ranks holding it. Two split domains share at most one rank (the one holding the end of the first
//! and the start of the second), and the groups of every other split domain are disjoint, so two
//! rounds of `split` (even and odd split domains) build every group.

use anyhow::{bail, Context, Result};
use mgrun_collectives::Communicator;
use std::fmt::Write as _;
use std::ops::Range;

/// Images `[lo, hi)` of training domain `domain`'s per-step batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub domain: usize,
    pub lo: usize,
    pub hi: usize,
}

impl Piece {
    pub fn len(&self) -> usize {
        self.hi - self.lo
    }

    pub fn is_empty(&self) -> bool {
        self.hi == self.lo
    }
}

/// The pieces of every rank for one job (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardingPlan {
    world: usize,
    num_domains: usize,
    batch_per_domain: usize,
    unit: usize,
    /// First unit of every rank, and the total as a last entry.
    starts: Vec<usize>,
    pieces: Vec<Vec<Piece>>,
}

impl ShardingPlan {
    /// The balanced plan of `world` ranks over `num_domains` domains of `batch_per_domain` images,
    /// cut into units of `unit` images.
    pub fn balanced(world: usize, num_domains: usize, batch_per_domain: usize, unit: usize) -> Result<Self> {
        if world == 0 {
            bail!("sharding: at least one rank is needed");
        }
        if num_domains == 0 {
            bail!("sharding: no training domains (data.test_domains holds out every domain)");
        }
        if batch_per_domain == 0 {
            bail!("sharding: data.batch_per_domain must be at least 1");
        }
        if unit == 0 {
            bail!("sharding: the unit (train.micro_batch) must be at least 1 image");
        }
        let units_per_domain = batch_per_domain.div_ceil(unit);
        let total = num_domains * units_per_domain;
        let starts: Vec<usize> = (0..=world).map(|r| r * total / world).collect();
        let pieces = (0..world)
            .map(|r| {
                let mut pieces: Vec<Piece> = Vec::new();
                for u in starts[r]..starts[r + 1] {
                    let domain = u / units_per_domain;
                    let j = u % units_per_domain;
                    let (lo, hi) = (j * unit, ((j + 1) * unit).min(batch_per_domain));
                    match pieces.last_mut() {
                        Some(last) if last.domain == domain && last.hi == lo => last.hi = hi,
                        _ => pieces.push(Piece { domain, lo, hi }),
                    }
                }
                pieces
            })
            .collect();
        Ok(Self { world, num_domains, batch_per_domain, unit, starts, pieces })
    }

    pub fn world(&self) -> usize {
        self.world
    }
    pub fn num_domains(&self) -> usize {
        self.num_domains
    }
    pub fn batch_per_domain(&self) -> usize {
        self.batch_per_domain
    }
    /// Images per unit (the last unit of a domain may hold fewer).
    pub fn unit(&self) -> usize {
        self.unit
    }
    pub fn units_per_domain(&self) -> usize {
        self.batch_per_domain.div_ceil(self.unit)
    }
    pub fn total_units(&self) -> usize {
        self.num_domains * self.units_per_domain()
    }

    /// Rank `rank`'s pieces, in domain order.
    pub fn pieces(&self, rank: usize) -> &[Piece] {
        self.pieces.get(rank).map_or(&[], Vec::as_slice)
    }

    /// The global indices of rank `rank`'s units (domain-major: unit j of domain e is e * U + j).
    pub fn units_of(&self, rank: usize) -> Range<usize> {
        self.starts[rank.min(self.world)]..self.starts[(rank + 1).min(self.world)]
    }

    /// The most units any rank holds (⌈N/W⌉).
    pub fn max_units_per_rank(&self) -> usize {
        (0..self.world).map(|r| self.units_of(r).len()).max().unwrap_or(0)
    }

    /// The rank holding global unit `unit`, and its position among that rank's units.
    pub fn unit_location(&self, unit: usize) -> (usize, usize) {
        // starts is sorted; the owner is the last rank whose run starts at or before `unit`
        // (empty runs of ranks with no units share a start and are skipped this way).
        let owner = self.starts[..self.world].partition_point(|&s| s <= unit).saturating_sub(1);
        (owner, unit - self.starts[owner])
    }

    /// Images `[lo, hi)` of unit `j` of a domain.
    pub fn unit_images(&self, j: usize) -> (usize, usize) {
        (j * self.unit, ((j + 1) * self.unit).min(self.batch_per_domain))
    }

    /// Images computed by `rank` per pass.
    pub fn images(&self, rank: usize) -> usize {
        self.pieces(rank).iter().map(Piece::len).sum()
    }

    /// The ranks holding a piece of `domain`, in rank order.
    pub fn holders(&self, domain: usize) -> Vec<usize> {
        (0..self.world).filter(|&r| self.pieces(r).iter().any(|p| p.domain == domain)).collect()
    }

    /// Domains held by more than one rank, in domain order.
    pub fn split_domains(&self) -> Vec<usize> {
        (0..self.num_domains).filter(|&e| self.holders(e).len() > 1).collect()
    }

    /// The split domains of the two rounds of domain-group creation: every other split domain, so
    /// that the groups of one round are disjoint.
    pub fn group_rounds(&self) -> [Vec<usize>; 2] {
        let mut rounds = [Vec::new(), Vec::new()];
        for (i, e) in self.split_domains().into_iter().enumerate() {
            rounds[i % 2].push(e);
        }
        rounds
    }

    /// Largest over smallest images per rank (1.0 when perfectly balanced; infinite when a rank
    /// computes nothing).
    pub fn imbalance(&self) -> f64 {
        let images: Vec<usize> = (0..self.world).map(|r| self.images(r)).collect();
        let (max, min) = (images.iter().copied().max().unwrap_or(0), images.iter().copied().min().unwrap_or(0));
        if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        }
    }

    /// One line per rank: its pieces and images, then the split domains and their groups.
    pub fn describe(&self, domain_names: &[String]) -> String {
        let name = |e: usize| domain_names.get(e).cloned().unwrap_or_else(|| format!("domain {e}"));
        let mut out = String::new();
        for r in 0..self.world {
            let pieces: Vec<String> =
                self.pieces(r).iter().map(|p| format!("{}[{}..{})", name(p.domain), p.lo, p.hi)).collect();
            let pieces =
                if pieces.is_empty() { "nothing (more ranks than units)".to_string() } else { pieces.join(" + ") };
            let _ = writeln!(out, "  rank {r}: {} images: {pieces}", self.images(r));
        }
        let split = self.split_domains();
        if split.is_empty() {
            let _ = writeln!(out, "  no domain is split over ranks");
        } else {
            let groups: Vec<String> =
                split.iter().map(|&e| format!("{} on ranks {:?}", name(e), self.holders(e))).collect();
            let _ = writeln!(out, "  split domains: {}", groups.join(", "));
        }
        out
    }
}

/// A sub-communicator of the ranks holding a split domain.
pub struct DomainGroup {
    pub domain: usize,
    pub comm: Box<dyn Communicator>,
}

/// The domain groups this rank belongs to, in domain order (every rank of `world` must call it with
/// the same plan): two rounds of `split`, skipped when no domain is split.
pub fn domain_groups(world: &dyn Communicator, plan: &ShardingPlan) -> Result<Vec<DomainGroup>> {
    let rank = world.rank();
    let mut groups = Vec::new();
    for round in plan.group_rounds() {
        if round.is_empty() {
            continue;
        }
        // Members of a group share its domain's colour; everyone else gets a colour of its own.
        let mine = round.iter().copied().find(|&e| plan.pieces(rank).iter().any(|p| p.domain == e));
        let color = match mine {
            Some(domain) => domain,
            None => plan.num_domains() + rank,
        };
        let comm = world.split(color).with_context(|| format!("rank {rank}: creating the domain groups"))?;
        if let Some(domain) = mine {
            groups.push(DomainGroup { domain, comm });
        }
    }
    groups.sort_by_key(|g| g.domain);
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every (domain, image) is computed by exactly one rank, units stay whole, and every rank holds
    /// ⌊N/W⌋ or ⌈N/W⌉ units, for W < K, W = K, W > K and W not a multiple of K.
    #[test]
    fn plans_cover_every_image_once_and_balance_units() {
        for (k, b, unit) in [(3, 32, 1), (5, 32, 1), (3, 8, 2), (5, 8, 3), (4, 7, 2), (1, 5, 1)] {
            for world in 1..=12 {
                let plan = ShardingPlan::balanced(world, k, b, unit).unwrap();
                let mut seen = vec![vec![0u32; b]; k];
                for r in 0..world {
                    let mut last_domain = None;
                    for p in plan.pieces(r) {
                        assert!(p.lo % unit == 0 && (p.hi % unit == 0 || p.hi == b), "unit cut: {p:?}");
                        assert!(last_domain < Some(p.domain), "pieces in domain order");
                        last_domain = Some(p.domain);
                        for count in &mut seen[p.domain][p.lo..p.hi] {
                            *count += 1;
                        }
                    }
                }
                assert!(seen.iter().flatten().all(|&c| c == 1), "k {k} b {b} w {world}: {seen:?}");
                let n = plan.total_units();
                for r in 0..world {
                    let units = plan.units_of(r).len();
                    assert!(units == n / world || units == n.div_ceil(world), "k {k} w {world} rank {r}: {units}");
                }
            }
        }
    }

    #[test]
    fn image_balance_meets_the_target() {
        // Fast path: max/min images per rank <= 1 + 1/floor(KB/W).
        for k in [3, 4, 5] {
            for world in 1..=8 {
                let plan = ShardingPlan::balanced(world, k, 32, 1).unwrap();
                let floor = (k * 32 / world) as f64;
                assert!(plan.imbalance() <= 1.0 + 1.0 / floor + 1e-12, "k {k} w {world}: {}", plan.imbalance());
            }
        }
    }

    #[test]
    fn split_domains_and_two_disjoint_group_rounds() {
        // 3 ranks, 5 domains of 32: 53/53/54 images; domains 1 and 3 are split.
        let plan = ShardingPlan::balanced(3, 5, 32, 1).unwrap();
        assert_eq!(plan.pieces(0), [Piece { domain: 0, lo: 0, hi: 32 }, Piece { domain: 1, lo: 0, hi: 21 }]);
        assert_eq!(plan.split_domains(), vec![1, 3]);
        assert_eq!(plan.holders(3), vec![1, 2]);
        for world in 1..=12 {
            for k in [2, 3, 5] {
                let plan = ShardingPlan::balanced(world, k, 8, 1).unwrap();
                for round in plan.group_rounds() {
                    let mut members: Vec<usize> = round.iter().flat_map(|&e| plan.holders(e)).collect();
                    let total = members.len();
                    members.sort_unstable();
                    members.dedup();
                    assert_eq!(members.len(), total, "w {world} k {k}: groups of one round overlap");
                }
            }
        }
    }

    #[test]
    fn unit_locations_follow_the_runs() {
        let plan = ShardingPlan::balanced(5, 3, 8, 2).unwrap(); // 12 units: 2,2,3,2,3
        for r in 0..5 {
            for (slot, u) in plan.units_of(r).enumerate() {
                assert_eq!(plan.unit_location(u), (r, slot));
            }
        }
        assert_eq!(plan.max_units_per_rank(), 3);
        // More ranks than units: some ranks hold nothing and are skipped.
        let plan = ShardingPlan::balanced(5, 1, 4, 2).unwrap();
        for u in 0..plan.total_units() {
            let (r, slot) = plan.unit_location(u);
            assert_eq!(plan.units_of(r).start + slot, u);
        }
        assert!(plan.describe(&[]).contains("nothing"));
    }
}
