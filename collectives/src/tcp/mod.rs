//! CPU collectives over TCP: a ring of one outgoing (to rank+1) and one incoming (from rank-1) socket per
//! rank, bootstrapped through the rendezvous store.
//!
//! Large all-reduces run ring reduce-scatter + all-gather, cut into segments and pipelined: a segment is
//! forwarded to the next rank as soon as it has been received and reduced, so reduction of one segment
//! overlaps the transfer of the following ones. Small all-reduces all-gather the whole buffers (n-1 hops
//! instead of 2(n-1)) and reduce locally in rank order, so every rank gets bit-identical results.
//!
//! Device: a communicator of a CUDA rank takes CUDA tensors and moves them through a pinned host
//! buffer (as gloo does); a CPU communicator works on the tensors' own memory when it is contiguous.
//!
//! Failures: every socket read and write is bounded by the timeout. The first rank to notice a dead or
//! stalled peer publishes that peer's rank in the store before closing its own sockets; ranks further
//! down the ring then see their link close, read the published rank and report it, so every rank names
//! the rank that actually failed.
//!
//! Layout: `links` (sockets, addresses, the hello, timeouts), `wire` (the collective header), `ring` (the
//! ring pass and chain broadcast), `reduce` (element-wise reductions), `fault` (naming the failed rank),
//! and `raw`, the one file with raw-pointer code, which it keeps behind a safe interface.

mod fault;
mod links;
mod raw;
mod reduce;
mod ring;
mod wire;

use crate::members::Members;
use crate::staging::HostStaging;
use crate::store::StoreClient;
use crate::{check_device, CommError, Communicator, ReduceOp, Result};
use links::{io_error, Links};
use raw::{AlignedBuf, RingBytes};
use reduce::{divide_bytes, reduce_bytes, Elem};
use ring::{even_chunks, Reduction, RingWork};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::{Device, Kind, Tensor};
use tokio::runtime::Runtime;
use wire::{op_code, Header, KIND_ALL_GATHER, KIND_ALL_REDUCE, KIND_ALL_REDUCE_SMALL, KIND_BARRIER, KIND_BROADCAST};

/// Tuning knobs of the TCP backend; [`TcpOptions::from_env`] reads overrides from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// Pipelining granularity of the ring (bytes per segment). Env `MGRUN_COMM_SEGMENT_BYTES`.
    pub segment_bytes: usize,
    /// All-reduces of at most this many bytes use the latency-optimised all-gather path.
    /// Env `MGRUN_COMM_SMALL_BYTES`.
    pub small_bytes: usize,
    /// SO_SNDBUF/SO_RCVBUF for the ring sockets; `None` keeps the kernel's auto-tuning.
    /// Env `MGRUN_COMM_SOCKET_BUFFER_BYTES` (0 = auto-tuning).
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { segment_bytes: 256 << 10, small_bytes: 32 << 10, socket_buffer_bytes: None }
    }
}

impl TcpOptions {
    /// Defaults, overridden by `MGRUN_COMM_SEGMENT_BYTES`, `MGRUN_COMM_SMALL_BYTES` and
    /// `MGRUN_COMM_SOCKET_BUFFER_BYTES` where set.
    pub fn from_env() -> Result<Self> {
        let mut options = TcpOptions::default();
        let read = |name: &'static str| -> Result<Option<usize>> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(text) => text.trim().parse::<usize>().map(Some).map_err(|e| CommError::Invalid {
                    op: "tcp options",
                    message: format!("environment variable {name}={text:?} is not a byte count: {e}"),
                }),
            }
        };
        if let Some(bytes) = read("MGRUN_COMM_SEGMENT_BYTES")? {
            options.segment_bytes = bytes;
        }
        if let Some(bytes) = read("MGRUN_COMM_SMALL_BYTES")? {
            options.small_bytes = bytes;
        }
        if let Some(bytes) = read("MGRUN_COMM_SOCKET_BUFFER_BYTES")? {
            options.socket_buffer_bytes = (bytes > 0).then_some(bytes);
        }
        // Segments hold whole elements of every supported dtype.
        options.segment_bytes = (options.segment_bytes / 8).max(1) * 8;
        Ok(options)
    }
}

struct State {
    // Field order matters: the sockets are dropped before the runtime that owns their reactor.
    links: Option<Links>,
    runtime: Runtime,
    /// Number of collectives issued so far; part of every header so reordered calls are caught.
    sequence: u64,
    splits: usize,
    /// Set after a failure: the links are closed and every later call fails with this message.
    failure: Option<String>,
}

/// The TCP ring backend (see the module docs).
pub struct TcpCommunicator {
    rank: usize,
    world_size: usize,
    /// Rank in the original world of each rank of this (possibly split) group, for error messages.
    global_ranks: Vec<usize>,
    /// Store key prefix unique to this communicator.
    prefix: String,
    store: Arc<StoreClient>,
    timeout: Duration,
    options: TcpOptions,
    /// The device of the tensors it takes (see the module docs).
    device: Device,
    /// Pinned host memory for the tensors of a CUDA device.
    staging: HostStaging,
    state: Mutex<State>,
}

impl std::fmt::Debug for TcpCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("global_ranks", &self.global_ranks)
            .field("device", &self.device)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl TcpCommunicator {
    /// Joins the world of `world_size` ranks as `rank`, taking tensors on `device`: listens on a free
    /// port, publishes its address in the store and connects to its ring neighbours. Options come from
    /// [`TcpOptions::from_env`].
    pub fn connect(
        store: &StoreClient,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        Self::connect_with(store, rank, world_size, device, timeout, TcpOptions::from_env()?)
    }

    pub fn connect_with(
        store: &StoreClient,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
        options: TcpOptions,
    ) -> Result<Self> {
        let members = Members::whole_world("connect", rank, world_size)?;
        let store = Arc::new(store.try_clone()?);
        // Each rank counts its own world connections, so a job that builds several worlds (e.g. a
        // benchmark, then training) gets fresh keys each time as long as every rank does the same.
        let generation = store.add(&format!("mgrun/tcp/generation/{rank}"), 1)?;
        let prefix = format!("mgrun/tcp/world{generation}");
        Self::build(store, prefix, members, device, timeout, options)
    }

    fn build(
        store: Arc<StoreClient>,
        prefix: String,
        members: Members,
        device: Device,
        timeout: Duration,
        options: TcpOptions,
    ) -> Result<Self> {
        let Members { rank, world_size, global_ranks } = members;
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(io_error("tcp runtime"))?;
        let mut communicator = TcpCommunicator {
            rank,
            world_size,
            global_ranks,
            prefix,
            store,
            timeout,
            options,
            device,
            staging: HostStaging::default(),
            state: Mutex::new(State { links: None, runtime, sequence: 0, splits: 0, failure: None }),
        };
        if world_size > 1 {
            let links = communicator.establish_links()?;
            communicator.state_mut().links = Some(links);
        }
        Ok(communicator)
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `work` on the ring links; a failure closes the links for good and is attributed to a rank.
    fn run_on_links(&self, op: &'static str, header: Header, work: RingWork<'_>) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(failure) = &state.failure {
            return Err(CommError::Invalid {
                op,
                message: format!("this communicator failed earlier and cannot be used again: {failure}"),
            });
        }
        state.sequence += 1;
        let header = Header { sequence: state.sequence, ..header };
        let State { links, runtime, .. } = &mut *state;
        let Some(links) = links.as_mut() else {
            return Ok(()); // world of one
        };
        let outcome = runtime.block_on(work.run(links, header, self.timeout, self.rank, self.options.segment_bytes));
        match outcome {
            Ok(()) => Ok(()),
            Err(failure) => {
                let error = self.attribute(op, failure, header.sequence);
                state.failure = Some(error.to_string());
                // Closing our sockets lets the ranks downstream notice at once instead of timing out.
                state.links = None;
                Err(error)
            }
        }
    }
}

impl TcpCommunicator {
    /// Runs `work` on host memory holding `tensor`'s values: the tensor's own storage when it is
    /// contiguous CPU memory, otherwise a contiguous host copy (pinned, for CUDA tensors) whose result
    /// is copied back into the tensor.
    fn with_host_bytes(
        &self,
        tensor: &mut Tensor,
        op: &'static str,
        work: impl FnOnce(RingBytes<'_>) -> Result<()>,
    ) -> Result<()> {
        let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
        if bytes == 0 {
            return Ok(());
        }
        if let Some(buffer) = RingBytes::of_tensor(tensor) {
            return work(buffer);
        }
        let mut host = self.host_tensor(op, &tensor.size(), tensor.kind())?;
        tch::no_grad(|| host.shallow_clone().f_copy_(tensor))
            .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the tensor to host memory: {e}") })?;
        work(host_bytes(&mut host, op)?)?;
        tch::no_grad(|| tensor.f_copy_(&host))
            .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the result back: {e}") })
    }

    /// An uninitialised contiguous host tensor: pinned staging memory on CUDA ranks, a fresh
    /// allocation on CPU ranks.
    fn host_tensor(&self, op: &'static str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        if self.device == Device::Cpu {
            return Tensor::f_empty(shape, (kind, Device::Cpu))
                .map_err(|e| CommError::Invalid { op, message: format!("cannot allocate host memory: {e}") });
        }
        self.staging.tensor(op, shape, kind)
    }
}

/// The storage of a tensor made by `host_tensor` (contiguous CPU memory by construction).
fn host_bytes<'a>(host: &'a mut Tensor, op: &'static str) -> Result<RingBytes<'a>> {
    RingBytes::of_tensor(host)
        .ok_or_else(|| CommError::Invalid { op, message: "host buffer is not contiguous CPU memory".into() })
}

fn check_alignment(buffer: &RingBytes<'_>, elem_size: usize, op: &'static str) -> Result<()> {
    // Element sizes are powers of two.
    if !buffer.is_aligned_to(elem_size) {
        return Err(CommError::Invalid { op, message: "tensor storage is not aligned to its element size".into() });
    }
    Ok(())
}

impl Communicator for TcpCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
    fn device(&self) -> Device {
        self.device
    }

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        check_device(self, OP, tensor)?;
        let elem = Elem::of(tensor.kind()).ok_or_else(|| CommError::Invalid {
            op: OP,
            message: format!("dtype {:?} is not supported (f32, f64, i64)", tensor.kind()),
        })?;
        if elem == Elem::I64 && op == ReduceOp::Avg {
            return Err(CommError::Invalid { op: OP, message: "Avg is not defined for i64 tensors".into() });
        }
        let n = self.world_size;
        if n == 1 {
            return Ok(());
        }
        let (rank, small_bytes) = (self.rank, self.options.small_bytes);
        self.with_host_bytes(tensor, OP, |buffer| {
            check_alignment(&buffer, elem.size(), OP)?;
            let bytes = buffer.len();
            let kind_code = op_code(op) | (elem.code() << 4);
            if bytes <= small_bytes {
                // Gather every rank's buffer, then reduce locally in rank order.
                let mut gathered = AlignedBuf::zeroed(bytes * n);
                buffer.with_bytes(0..bytes, |mine| {
                    gathered.as_bytes_mut()[rank * bytes..(rank + 1) * bytes].copy_from_slice(mine)
                });
                let chunks: Vec<Range<usize>> = (0..n).map(|r| r * bytes..(r + 1) * bytes).collect();
                let header = Header::new(KIND_ALL_REDUCE_SMALL | kind_code, bytes);
                let all = RingBytes::of_slice(gathered.as_bytes_mut());
                self.run_on_links(OP, header, RingWork::Pass { buffer: all, chunks, steps: n - 1, reduction: None })?;
                buffer.with_bytes_mut(0..bytes, |target| {
                    let all = gathered.as_bytes_mut();
                    target.copy_from_slice(&all[0..bytes]);
                    for r in 1..n {
                        reduce_bytes(elem, op, target, &all[r * bytes..(r + 1) * bytes]);
                    }
                    if op == ReduceOp::Avg {
                        divide_bytes(elem, target, n);
                    }
                });
                return Ok(());
            }
            let chunks = even_chunks(bytes, elem.size(), n);
            let reduction = Some(Reduction { elem, op, steps: n - 1, world_size: n });
            let header = Header::new(KIND_ALL_REDUCE | kind_code, bytes);
            self.run_on_links(OP, header, RingWork::Pass { buffer, chunks, steps: 2 * (n - 1), reduction })
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        check_device(self, OP, tensor)?;
        let n = self.world_size;
        if root >= n {
            return Err(CommError::Invalid { op: OP, message: format!("root {root} is not a rank of a group of {n}") });
        }
        if n == 1 {
            return Ok(());
        }
        let kind_code = tensor.kind().elt_size_in_bytes() as u32;
        self.with_host_bytes(tensor, OP, |buffer| {
            let header = Header::new(KIND_BROADCAST | ((root as u32) << 4) | kind_code, buffer.len());
            self.run_on_links(OP, header, RingWork::Broadcast { buffer, root, world_size: n })
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        check_device(self, OP, tensor)?;
        let n = self.world_size;
        let mut shape = vec![n as i64];
        shape.extend(tensor.size());
        let mut gathered = self.host_tensor(OP, &shape, tensor.kind())?;
        tch::no_grad(|| gathered.get(self.rank as i64).f_copy_(tensor))
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot copy the input: {e}") })?;
        if n > 1 {
            let bytes = tensor.numel() * tensor.kind().elt_size_in_bytes();
            let chunks: Vec<Range<usize>> = (0..n).map(|r| r * bytes..(r + 1) * bytes).collect();
            let header = Header::new(KIND_ALL_GATHER | tensor.kind().elt_size_in_bytes() as u32, bytes);
            if bytes > 0 {
                let buffer = host_bytes(&mut gathered, OP)?;
                self.run_on_links(OP, header, RingWork::Pass { buffer, chunks, steps: n - 1, reduction: None })?;
            }
        }
        if tensor.device() == Device::Cpu {
            return Ok(gathered);
        }
        gathered
            .f_to_device(tensor.device())
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot copy the result to the device: {e}") })
    }

    fn barrier(&self) -> Result<()> {
        let n = self.world_size;
        if n == 1 {
            return Ok(());
        }
        // A one-byte all-gather: a rank leaves only after data from every rank has reached it.
        let mut tokens = vec![0u8; n];
        let buffer = RingBytes::of_slice(&mut tokens);
        let chunks: Vec<Range<usize>> = (0..n).map(|r| r..r + 1).collect();
        let work = RingWork::Pass { buffer, chunks, steps: n - 1, reduction: None };
        self.run_on_links("barrier", Header::new(KIND_BARRIER, n), work)
    }

    fn split(&self, color: usize) -> Result<Box<dyn Communicator>> {
        let split_index = {
            let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(failure) = &state.failure {
                return Err(CommError::Invalid {
                    op: "split",
                    message: format!("this communicator failed earlier and cannot be used again: {failure}"),
                });
            }
            state.splits += 1;
            state.splits
        };
        let base = format!("{}/split{split_index}", self.prefix);
        let read_color = |key: &str, peer| {
            self.store.get(key).map_err(|_| CommError::Timeout {
                op: "split",
                peer,
                timeout_s: self.timeout.as_secs_f64(),
            })
        };
        let group = Members::of_color("split", &self.store, &base, color, self.rank, &self.global_ranks, read_color)?;
        let communicator = TcpCommunicator::build(
            self.store.clone(),
            format!("{base}/color{color}"),
            group,
            self.device,
            self.timeout,
            self.options,
        )?;
        Ok(Box::new(communicator))
    }
}
