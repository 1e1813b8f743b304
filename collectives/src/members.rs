//! A rank's place in a group of ranks, for the backends that bootstrap through the rendezvous store:
//! the whole world they connect to, and the group a split forms from the ranks of one color.

use crate::store::StoreClient;
use crate::{CommError, Result};

/// This rank's place in a (possibly split) group.
pub(crate) struct Members {
    pub rank: usize,
    pub world_size: usize,
    /// Rank in the original world of each rank of the group.
    pub global_ranks: Vec<usize>,
}

impl Members {
    /// Rank `rank` of a whole world of `world_size` ranks; an error for `op` when it is not in it.
    pub fn whole_world(op: &'static str, rank: usize, world_size: usize) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(CommError::Invalid {
                op,
                message: format!("rank {rank} is not in a world of {world_size} ranks"),
            });
        }
        Ok(Members { rank, world_size, global_ranks: (0..world_size).collect() })
    }

    /// The group of the ranks that pass the same `color` as rank `rank` of the group `global_ranks`,
    /// ordered by their rank there: every rank publishes its color under `base` in `store`, then
    /// `read_color(key, global rank)` reads each rank's (the backend decides how long it waits).
    pub fn of_color(
        op: &'static str,
        store: &StoreClient,
        base: &str,
        color: usize,
        rank: usize,
        global_ranks: &[usize],
        read_color: impl Fn(&str, usize) -> Result<Vec<u8>>,
    ) -> Result<Self> {
        store.set(&format!("{base}/color/{rank}"), color.to_string().as_bytes())?;
        let mut members = Vec::new();
        for (peer, &global_peer) in global_ranks.iter().enumerate() {
            let key = format!("{base}/color/{peer}");
            let value = read_color(&key, global_peer)?;
            let peer_color =
                std::str::from_utf8(&value).ok().and_then(|text| text.parse::<usize>().ok()).ok_or_else(|| {
                    CommError::Invalid { op, message: format!("store key {key} holds a malformed color") }
                })?;
            if peer_color == color {
                members.push(peer);
            }
        }
        let new_rank = members.iter().position(|&member| member == rank).ok_or_else(|| CommError::Invalid {
            op,
            message: "this rank is missing from its own color group".into(),
        })?;
        let global_ranks = members.iter().map(|&member| global_ranks[member]).collect();
        Ok(Members { rank: new_rank, world_size: members.len(), global_ranks })
    }
}
