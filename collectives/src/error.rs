use thiserror::Error;

/// Why a collective failed. Errors name the peer rank where one is known.
#[derive(Debug, Error)]
pub enum CommError {
    #[error("{op}: no progress from rank {peer} within {timeout_s} s (comm.timeout_s); is that rank alive?")]
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
