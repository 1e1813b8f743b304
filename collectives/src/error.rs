use thiserror::Error;

/// Why a collective failed. Errors name the peer rank where one is known.
#[derive(Debug, Error)]
pub enum CommError {
    #[error("{op}: no progress from rank {peer} within {timeout_s} s (comm.timeout_s); is that rank alive?")]
    // `stalled_rank_in` reads this message back: keep the two together.
    Timeout { op: &'static str, peer: usize, timeout_s: f64 },
    #[error("{op}: connection to rank {peer} closed: {source}")]
    PeerLost { op: &'static str, peer: usize, source: std::io::Error },
    #[error("rendezvous store at {addr}: {message}")]
    Store { addr: String, message: String },
    #[error(
        "{op}: rank {rank}: the tensor is on {tensor_device:?} but this {backend} communicator works on \
         {comm_device:?}; every collective takes tensors on its communicator's device"
    )]
    WrongDevice {
        op: &'static str,
        rank: usize,
        backend: &'static str,
        tensor_device: tch::Device,
        comm_device: tch::Device,
    },
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    #[error("{op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
}

/// The words of [`CommError::Timeout`]'s message before the stalled rank.
const NO_PROGRESS_FROM: &str = "no progress from rank ";

impl CommError {
    /// The rank that a [`CommError::Timeout`] blames, read back from a line of a rank's stderr that
    /// shows the error: the launcher names that rank, not the one that timed out, as the root cause.
    pub fn stalled_rank_in(line: &str) -> Option<usize> {
        let after = &line[line.find(NO_PROGRESS_FROM)? + NO_PROGRESS_FROM.len()..];
        let digits = after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len());
        after[..digits].parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::CommError;

    #[test]
    fn the_stalled_rank_is_read_back_from_the_timeout_message() {
        let error = CommError::Timeout { op: "all_reduce", peer: 12, timeout_s: 3.0 };
        let line = format!("[rank 0] error: training step 7: {error}");
        assert_eq!(CommError::stalled_rank_in(&line), Some(12));
        let lost = CommError::PeerLost { op: "all_reduce", peer: 3, source: std::io::Error::other("reset") };
        assert_eq!(CommError::stalled_rank_in(&lost.to_string()), None);
    }
}
