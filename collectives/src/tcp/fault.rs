//! Naming the rank that failed (see the module docs of `tcp`): the first rank to notice a dead or stalled
//! peer publishes it in the store, and the others report the published rank.

use super::links::{LinkFailure, Side};
use super::TcpCommunicator;
use crate::CommError;
use std::time::Duration;

/// How long a rank that saw its link close waits for the store to say which rank failed first.
const FAULT_LOOKUP_WAIT: Duration = Duration::from_millis(150);
/// After a timeout, how long a rank waits for the other waiting ranks to say so (see `find_stalled_rank`).
const STALL_SETTLE: Duration = Duration::from_millis(500);

impl TcpCommunicator {
    /// Turns a link failure into an error naming the rank that failed first (see the module docs), and
    /// publishes our own diagnosis when nobody has published one yet.
    pub(super) fn attribute(&self, op: &'static str, failure: LinkFailure, sequence: u64) -> CommError {
        let (side, source) = match failure {
            LinkFailure::Mismatch(message) => return CommError::Invalid { op, message },
            LinkFailure::Io { side, source } => (side, Some(source)),
            LinkFailure::Stalled { side } => (side, None),
        };
        let neighbour = match side {
            Side::Next => (self.rank + 1) % self.world_size,
            Side::Prev => (self.rank + self.world_size - 1) % self.world_size,
        };
        let neighbour = self.global_ranks[neighbour];
        let fault_key = format!("{}/fault", self.prefix);
        let published = self
            .store
            .get_within(&fault_key, FAULT_LOOKUP_WAIT)
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse::<usize>().ok())
            .filter(|&failed| failed != self.global_ranks[self.rank]);
        match (published, source) {
            (Some(failed), source) if failed != neighbour => {
                let seen = match source {
                    Some(source) => format!("{source}"),
                    None => "no progress".to_string(),
                };
                CommError::PeerLost {
                    op,
                    peer: failed,
                    source: std::io::Error::other(format!(
                        "rank {failed} failed first (reported through the store); here it showed as \
                         '{seen}' on the link to rank {neighbour}"
                    )),
                }
            }
            (_, Some(source)) => {
                let _ = self.store.set(&fault_key, neighbour.to_string().as_bytes());
                CommError::PeerLost { op, peer: neighbour, source }
            }
            (_, None) => {
                let stalled = self.global_ranks[self.find_stalled_rank(side, sequence)];
                let _ = self.store.set(&fault_key, stalled.to_string().as_bytes());
                CommError::Timeout { op, peer: stalled, timeout_s: self.timeout.as_secs_f64() }
            }
        }
    }

    /// After a timeout every rank still waiting inside a collective says so in the store (with the
    /// collective's `sequence`); walking the ring from the silent neighbour past ranks that did, the first
    /// rank that did not is the one that stopped making progress. Alive ranks merely waiting on it are
    /// skipped whichever collective they wait in: a rank that finished one collective may already wait in
    /// the next while its neighbour still waits in the first, and blaming either would be wrong.
    fn find_stalled_rank(&self, side: Side, sequence: u64) -> usize {
        let n = self.world_size;
        let waiting_key = |rank: usize| format!("{}/waiting/{rank}", self.prefix);
        let _ = self.store.set(&waiting_key(self.rank), sequence.to_string().as_bytes());
        std::thread::sleep(STALL_SETTLE.min(self.timeout / 2));
        let step = |rank: usize| match side {
            Side::Next => (rank + 1) % n,
            Side::Prev => (rank + n - 1) % n,
        };
        let mut candidate = step(self.rank);
        for _ in 0..n {
            if candidate == self.rank {
                break;
            }
            match self.store.get_within(&waiting_key(candidate), Duration::ZERO) {
                Ok(Some(_)) => candidate = step(candidate),
                _ => return candidate,
            }
        }
        step(self.rank)
    }
}
