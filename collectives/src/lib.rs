//! Collective communication for mgrun ranks.
//!
//! A [`Communicator`] reduces, broadcasts and gathers tch tensors across the ranks of a job. Backends
//! are chosen at run time ([`Backend::select`]): [`tcp::TcpCommunicator`] (TCP ring, bootstrapped through the
//! rendezvous [`store`]; CPU ranks, and CUDA ranks through pinned host buffers) and, on GPUs,
//! [`nccl::NcclCommunicator`]. [`SingleRank`] is the trivial world of one.
//!
//! Every communicator has a device and takes tensors on that device only, in every backend (see
//! [`Communicator`]); [`scalars`] moves the few host values a job reduces (evaluation counts, losses,
//! the step to resume from) to and from that device.

pub mod bench;
pub mod bucket;
pub mod error;
mod members;
pub mod nccl;
pub mod rank_env;
pub mod scalars;
pub mod single;
mod staging;
pub mod store;
pub mod tcp;

pub use bucket::all_reduce_flat;
pub use error::CommError;
pub use rank_env::{DeviceKind, RankEnv};
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
/// **The device rule**: a communicator works on one device ([`Communicator::device`]) and every
/// collective takes tensors on that device, whatever the backend and the world size, so that code
/// which passes a host tensor to a GPU communicator fails on one rank as it would on eight. A
/// violation is [`CommError::WrongDevice`], naming the operation, both devices and the rank.
/// Host values go through [`scalars`].
///
/// Results are written in place (all_reduce, broadcast) or returned on the communicator's device
/// (all_gather). A peer that dies or stalls yields an error within the communicator's timeout.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Short backend name for logs and benchmark tables ("tcp", "nccl", "single").
    fn backend(&self) -> &'static str;
    /// The device of every tensor this communicator takes and returns.
    fn device(&self) -> Device;

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

/// Checks the device rule (see [`Communicator`]) for `tensor` passed to `op`.
pub fn check_device(comm: &dyn Communicator, op: &'static str, tensor: &Tensor) -> Result<()> {
    let device = tensor.device();
    if device == comm.device() {
        return Ok(());
    }
    Err(CommError::WrongDevice {
        op,
        rank: comm.rank(),
        backend: comm.backend(),
        tensor_device: device,
        comm_device: comm.device(),
    })
}

/// Which [`Communicator`] implementation connects the ranks of a job (`comm.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Tcp,
    Nccl,
}

/// What a job asks for in `comm.backend`; [`Backend::select`] turns it into the [`Backend`] a rank uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// NCCL on CUDA devices of their own, TCP otherwise.
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl std::str::FromStr for BackendChoice {
    type Err = CommError;
    fn from_str(text: &str) -> Result<BackendChoice> {
        match text {
            "auto" => Ok(BackendChoice::Auto),
            "tcp" => Ok(BackendChoice::Tcp),
            "nccl" => Ok(BackendChoice::Nccl),
            other => Err(CommError::Invalid {
                op: "comm.backend",
                message: format!("expected \"auto\", \"tcp\" or \"nccl\", got {other:?}"),
            }),
        }
    }
}

impl Backend {
    /// Resolves `requested` for ranks computing on `device`, with `ranks_per_gpu` ranks sharing each
    /// GPU: auto is NCCL on CUDA devices of their own and TCP otherwise; NCCL on the CPU or on shared
    /// GPUs is refused with a message saying what to do.
    pub fn select(requested: BackendChoice, device: Device, ranks_per_gpu: usize) -> Result<Backend> {
        let on_cuda = matches!(device, Device::Cuda(_));
        let shared = on_cuda && ranks_per_gpu > 1;
        match requested {
            BackendChoice::Auto if on_cuda && !shared => Ok(Backend::Nccl),
            BackendChoice::Auto | BackendChoice::Tcp => Ok(Backend::Tcp),
            BackendChoice::Nccl if shared => Err(CommError::Invalid {
                op: "comm.backend",
                message: format!(
                    "\"nccl\" cannot run {ranks_per_gpu} ranks on one GPU (NCCL refuses two ranks of a communicator \
                     on the same device); shared GPUs (--ranks-per-gpu) need comm.backend = \"tcp\" or \"auto\""
                ),
            }),
            BackendChoice::Nccl if on_cuda => Ok(Backend::Nccl),
            BackendChoice::Nccl => Err(CommError::Invalid {
                op: "comm.backend",
                message: format!(
                    "\"nccl\" needs CUDA devices, but this rank computes on {device:?}; launch with --gpus N, \
                     or use comm.backend = \"auto\" or \"tcp\""
                ),
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
        Backend::Tcp => Box::new(tcp::TcpCommunicator::connect(store, rank, world_size, device, timeout)?),
        Backend::Nccl => Box::new(nccl::NcclCommunicator::connect(store, rank, world_size, device, timeout)?),
    })
}
