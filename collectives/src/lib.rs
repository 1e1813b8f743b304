//! Collective communication for mgrun ranks.
//!
//! A [`Communicator`] reduces, broadcasts and gathers tch tensors across the ranks of a job. Backends
//! are chosen at run time ([`Backend::select`]): [`tcp::TcpCommunicator`] (CPU, TCP ring, bootstrapped through the
//! rendezvous [`store`]) and, on GPUs, [`nccl::NcclCommunicator`]. [`SingleRank`] is the trivial world of one.

pub mod bench;
pub mod bucket;
pub mod error;
pub mod nccl;
pub mod single;
pub mod store;
pub mod tcp;

pub use bucket::all_reduce_flat;
pub use error::CommError;
pub use single::SingleRank;

use std::time::Duration;
use store::StoreClient;
use tch::{Device, Tensor};

/// Reduction applied element-wise by [`Communicator::all_reduce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size.
    Avg,
    Max,
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// Collectives over the ranks of one group. Every rank of the group must call the same collectives
/// in the same order with tensors of the same shape and dtype (f32 and f64 at least).
///
/// Tensors must be contiguous. Results are written in place (all_reduce, broadcast) or returned
/// (all_gather). A peer that dies or stalls yields an error within the communicator's timeout.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Short backend name for logs and benchmark tables ("tcp", "nccl", "single").
    fn backend(&self) -> &'static str;

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Overwrites `tensor` on every rank with the value held by `root`.
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()>;
    /// Concatenates every rank's `tensor` (same shape on all ranks) along a new leading dimension:
    /// the result has shape `[world_size, ...tensor.shape]`, rank order.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
    /// A communicator over the ranks that pass the same `color`, ordered by their rank here
    /// (MPI_Comm_split / ncclCommSplit). Every rank of this group must call it.
    fn split(&self, color: usize) -> Result<Box<dyn Communicator>>;
}

/// Which [`Communicator`] implementation connects the ranks of a job (`comm.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tcp,
    Nccl,
}

impl Backend {
    /// Resolves `comm.backend` ("auto", "tcp" or "nccl") for ranks computing on `device`: "auto" is NCCL
    /// on CUDA devices and TCP on the CPU; NCCL on the CPU is refused with a message saying what to do.
    pub fn select(requested: &str, device: Device) -> Result<Backend> {
        let on_cuda = matches!(device, Device::Cuda(_));
        match requested {
            "auto" if on_cuda => Ok(Backend::Nccl),
            "auto" | "tcp" => Ok(Backend::Tcp),
            "nccl" if on_cuda => Ok(Backend::Nccl),
            "nccl" => Err(CommError::Invalid {
                op: "comm.backend",
                message: format!(
                    "\"nccl\" needs CUDA devices, but this rank computes on {device:?}; launch with --gpus N, \
                     or use comm.backend = \"auto\" or \"tcp\""
                ),
            }),
            other => Err(CommError::Invalid {
                op: "comm.backend",
                message: format!("expected \"auto\", \"tcp\" or \"nccl\", got {other:?}"),
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }
}

/// Connects this rank to the world of `world_size` ranks with `backend`, bootstrapped through `store`.
pub fn connect(
    backend: Backend,
    store: &StoreClient,
    rank: usize,
    world_size: usize,
    device: Device,
    timeout: Duration,
) -> Result<Box<dyn Communicator>> {
    Ok(match backend {
        Backend::Tcp => Box::new(tcp::TcpCommunicator::connect(store, rank, world_size, timeout)?),
        Backend::Nccl => Box::new(nccl::NcclCommunicator::connect(store, rank, world_size, device, timeout)?),
    })
}
