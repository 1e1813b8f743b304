//! NCCL backend: collectives on tch CUDA tensors through `cudarc`'s NCCL bindings.
//!
//! Rank 0 of every communicator creates NCCL's unique id and publishes it through the rendezvous
//! [`StoreClient`]; every rank then joins with `ncclCommInitRankConfig`. Collectives take the tensors'
//! raw device pointers and run on the legacy default (null) stream, the stream tch computes on, so they
//! are ordered after the kernels that produced their inputs and before the ones that read the results.
//!
//! Communicators are non-blocking (`ncclConfig_t.blocking = 0`): initialisation and every collective are
//! polled until they finish or `timeout` passes, and a timed-out or failed communicator is aborted
//! (`ncclCommAbort`) instead of hanging. Each collective waits for its own completion before returning,
//! which is what gives every call a deadline; the host would wait for the reduced gradients anyway.
//!
//! `cudarc` loads libcuda and libnccl on first use and panics when they are missing, so every entry point
//! checks [`nccl_library_status`] first. cudarc asks the loader for `libnccl.so`; pip wheels only ship
//! `libnccl.so.2`, and the `mgrun` launcher puts a `libnccl.so` link to it on the ranks' LD_LIBRARY_PATH.

use crate::members::Members;
use crate::store::StoreClient;
use crate::{check_device, CommError, Communicator, ReduceOp, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError};
use cudarc::nccl::sys as nccl;
use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// `NCCL_CONFIG_UNDEF_INT` of nccl.h: "let NCCL choose".
const CONFIG_UNDEF_INT: i32 = i32::MIN;
/// `NCCL_VERSION(2, 28, 0)`: the ncclConfig_t layout of the bindings (feature `nccl-02028`).
const CONFIG_VERSION: u32 = 22800;
/// Size of `ncclUniqueId` as published through the store.
const UNIQUE_ID_BYTES: usize = 128;
/// Busy-wait (yielding) this long before polling with short sleeps: most collectives finish sooner.
const SPIN_PHASE: Duration = Duration::from_millis(2);
const POLL_SLEEP: Duration = Duration::from_micros(100);

/// Whether libcuda and libnccl can be loaded, with a message saying what is missing when not. cudarc
/// panics on first use when a library is absent, so this is checked before anything else touches it.
pub fn nccl_library_status() -> std::result::Result<(), String> {
    // SAFETY: both probes only try to dlopen the library by its candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the CUDA driver library (libcuda.so) cannot be loaded: no NVIDIA driver on this machine".into());
    }
    if !unsafe { nccl::is_culib_present() } {
        return Err("the NCCL library cannot be loaded: cudarc looks for `libnccl.so` on LD_LIBRARY_PATH (the \
                    `mgrun` launcher links it to the libnccl.so.2 next to libtorch; when running a rank by hand, \
                    put a directory holding a `libnccl.so` link to libnccl.so.2 on LD_LIBRARY_PATH)"
            .into());
    }
    Ok(())
}

/// NCCL's version as "major.minor.patch" (for the startup log).
pub fn nccl_version() -> Result<String> {
    nccl_library_status().map_err(|message| CommError::Invalid { op: "nccl version", message })?;
    let code = cudarc::nccl::result::get_nccl_version()
        .map_err(|e| CommError::Invalid { op: "nccl version", message: describe_result(e.0, None) })?;
    Ok(format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100))
}

/// One NCCL communicator over a group of ranks, one CUDA device per rank.
///
/// Not `Sync`: NCCL communicators must not be used by two threads at once.
pub struct NcclCommunicator {
    comm: nccl::ncclComm_t,
    rank: usize,
    world_size: usize,
    /// Rank in the job of every member of this group (for error messages and splits).
    global_ranks: Vec<usize>,
    device: Device,
    context: Arc<CudaContext>,
    /// The legacy default stream (null handle): the stream tch launches its kernels on.
    stream: Arc<CudaStream>,
    /// Recorded after every collective and polled with the deadline.
    completion: CudaEvent,
    store: Arc<StoreClient>,
    prefix: String,
    timeout: Duration,
    splits: Cell<usize>,
    /// Set when the communicator was aborted; every later call fails with this reason.
    failure: RefCell<Option<String>>,
}

// SAFETY: the raw `ncclComm_t` may be used from any thread as long as no two threads use it at once;
// `NcclCommunicator` is not `Sync`, so `&self` calls never overlap. The CUDA context is re-bound to the
// calling thread before every call.
unsafe impl Send for NcclCommunicator {}

impl std::fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("global_ranks", &self.global_ranks)
            .field("device", &self.device)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl NcclCommunicator {
    /// Joins the world of `world_size` ranks as `rank` on CUDA `device`: rank 0 publishes a fresh
    /// NCCL unique id in the store, every rank initialises its communicator, all within `timeout`.
    pub fn connect(
        store: &StoreClient,
        rank: usize,
        world_size: usize,
        device: Device,
        timeout: Duration,
    ) -> Result<Self> {
        let members = Members::whole_world("nccl connect", rank, world_size)?;
        let Device::Cuda(ordinal) = device else {
            return Err(CommError::Invalid {
                op: "nccl connect",
                message: format!("rank {rank}: NCCL needs a CUDA device, got {device:?}"),
            });
        };
        nccl_library_status().map_err(|message| CommError::Invalid { op: "nccl connect", message })?;
        let context = CudaContext::new(ordinal).map_err(|e| CommError::Invalid {
            op: "nccl connect",
            message: format!("rank {rank}: cannot use CUDA device {ordinal}: {}", describe_driver(e)),
        })?;
        let store = Arc::new(store.try_clone()?);
        // Each rank counts its own NCCL worlds, so every world a job builds gets fresh store keys.
        let generation = store.add(&format!("mgrun/nccl/generation/{rank}"), 1)?;
        let prefix = format!("mgrun/nccl/world{generation}");
        Self::build(store, prefix, members, device, context, timeout)
    }

    fn build(
        store: Arc<StoreClient>,
        prefix: String,
        members: Members,
        device: Device,
        context: Arc<CudaContext>,
        timeout: Duration,
    ) -> Result<Self> {
        let Members { rank, world_size, global_ranks } = members;
        let deadline = Instant::now() + timeout;
        let unique_id = exchange_unique_id(&store, &prefix, rank, &global_ranks, timeout)?;
        let driver_error = |what: &str, e: DriverError| CommError::Invalid {
            op: "nccl connect",
            message: format!("rank {}: {what}: {}", global_ranks[rank], describe_driver(e)),
        };
        context.bind_to_thread().map_err(|e| driver_error("binding the CUDA context", e))?;
        let completion = context.new_event(None).map_err(|e| driver_error("creating a CUDA event", e))?;
        let stream = context.default_stream();

        let mut config = nonblocking_config();
        let mut comm: nccl::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; NCCL copies the config.
        let status =
            unsafe { nccl::ncclCommInitRankConfig(&mut comm, world_size as i32, unique_id, rank as i32, &mut config) };
        let communicator = NcclCommunicator {
            comm,
            rank,
            world_size,
            global_ranks,
            device,
            context,
            stream,
            completion,
            store,
            prefix,
            timeout,
            splits: Cell::new(0),
            failure: RefCell::new(None),
        };
        if comm.is_null() {
            let message = format!("ncclCommInitRankConfig gave no communicator: {}", describe_result(status, None));
            communicator.failure.replace(Some(message.clone()));
            return Err(CommError::Invalid { op: "nccl init", message });
        }
        if !matches!(status, nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress) {
            return Err(communicator.fail("nccl init", status));
        }
        // Initialisation goes on in the background until every rank has joined.
        communicator.wait_for_nccl("nccl init", deadline)?;
        Ok(communicator)
    }

    fn check_usable(&self, op: &'static str) -> Result<()> {
        match &*self.failure.borrow() {
            Some(reason) => Err(CommError::Invalid {
                op,
                message: format!("this NCCL communicator was aborted earlier and cannot be used again: {reason}"),
            }),
            None => Ok(()),
        }
    }

    /// Aborts the communicator (so that nothing hangs on it) and describes `result`.
    fn fail(&self, op: &'static str, result: nccl::ncclResult_t) -> CommError {
        let message = describe_result(result, Some(self.comm));
        self.abort(&message);
        CommError::Invalid { op, message: format!("rank {}: NCCL failed: {message}", self.global_ranks[self.rank]) }
    }

    fn timed_out(&self, op: &'static str) -> CommError {
        self.abort(&format!("{op} did not finish within {:.1} s", self.timeout.as_secs_f64()));
        // NCCL does not say which rank stalled: name the first other member (exact in a group of two).
        let peer = (0..self.world_size).find(|&member| member != self.rank).unwrap_or(self.rank);
        CommError::Timeout { op, peer: self.global_ranks[peer], timeout_s: self.timeout.as_secs_f64() }
    }

    fn abort(&self, reason: &str) {
        if self.failure.borrow().is_some() {
            return;
        }
        self.failure.replace(Some(reason.to_string()));
        // SAFETY: the communicator is valid and not yet aborted; abort also stops its kernels.
        unsafe {
            nccl::ncclCommAbort(self.comm);
        }
    }

    /// Polls NCCL's asynchronous state until a non-blocking call has finished.
    fn wait_for_nccl(&self, op: &'static str, deadline: Instant) -> Result<()> {
        let started = Instant::now();
        loop {
            match self.async_state() {
                nccl::ncclResult_t::ncclSuccess => return Ok(()),
                nccl::ncclResult_t::ncclInProgress => {}
                failed => return Err(self.fail(op, failed)),
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(op));
            }
            pause(started);
        }
    }

    fn async_state(&self) -> nccl::ncclResult_t {
        let mut state = nccl::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is valid (callers check `failure` first) and `state` is writable.
        let status = unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut state) };
        if status != nccl::ncclResult_t::ncclSuccess {
            return status;
        }
        state
    }

    /// Enqueues one collective on the default stream, then waits, within the communicator's timeout,
    /// until it has run on the GPU.
    fn run(&self, op: &'static str, enqueue: impl FnOnce(nccl::ncclComm_t) -> nccl::ncclResult_t) -> Result<()> {
        self.check_usable(op)?;
        let deadline = Instant::now() + self.timeout;
        self.context.bind_to_thread().map_err(|e| self.driver_failure(op, "binding the CUDA context", e))?;
        match enqueue(self.comm) {
            nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => {}
            failed => return Err(self.fail(op, failed)),
        }
        self.wait_for_nccl(op, deadline)?;
        self.completion.record(&self.stream).map_err(|e| self.driver_failure(op, "recording a CUDA event", e))?;
        let started = Instant::now();
        loop {
            match self.completion.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.driver_failure(op, "waiting for the collective", e)),
            }
            match self.async_state() {
                nccl::ncclResult_t::ncclSuccess | nccl::ncclResult_t::ncclInProgress => {}
                failed => return Err(self.fail(op, failed)),
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(op));
            }
            pause(started);
        }
    }

    fn driver_failure(&self, op: &'static str, what: &str, error: DriverError) -> CommError {
        let message = format!("{what}: {}", describe_driver(error));
        self.abort(&message);
        CommError::Invalid { op, message: format!("rank {}: {message}", self.global_ranks[self.rank]) }
    }

    /// The NCCL type of a tensor this communicator can take, or why not.
    fn check_tensor(&self, op: &'static str, tensor: &Tensor) -> Result<nccl::ncclDataType_t> {
        check_device(self, op, tensor)?;
        nccl_type(tensor.kind()).ok_or_else(|| CommError::Invalid {
            op,
            message: format!("NCCL cannot reduce {:?} tensors", tensor.kind()),
        })
    }

    /// Runs `work` on `tensor`'s memory when it is contiguous, otherwise on a contiguous copy that is
    /// copied back afterwards.
    fn in_place(&self, op: &'static str, tensor: &mut Tensor, work: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        if tensor.is_contiguous() {
            return work(tensor);
        }
        let packed = tensor.contiguous();
        work(&packed)?;
        tch::no_grad(|| tensor.f_copy_(&packed))
            .map_err(|e| CommError::Invalid { op, message: format!("cannot copy the result back: {e}") })
    }
}

impl Drop for NcclCommunicator {
    fn drop(&mut self) {
        if self.failure.get_mut().is_none() && !self.comm.is_null() {
            // Every collective has completed before its call returned, so nothing of this communicator is
            // in flight: abort frees it without waiting on peers that may already be gone.
            let _ = self.context.bind_to_thread();
            // SAFETY: valid, not yet aborted, never used again.
            unsafe {
                nccl::ncclCommAbort(self.comm);
            }
        }
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn device(&self) -> Device {
        self.device
    }

    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "nccl all_reduce";
        let data_type = self.check_tensor(OP, tensor)?;
        if tensor.numel() == 0 {
            return Ok(());
        }
        let reduction = match op {
            ReduceOp::Sum => nccl::ncclRedOp_t::ncclSum,
            ReduceOp::Avg => nccl::ncclRedOp_t::ncclAvg,
            ReduceOp::Max => nccl::ncclRedOp_t::ncclMax,
        };
        self.in_place(OP, tensor, |buffer| {
            let (pointer, count) = (buffer.data_ptr(), buffer.numel());
            // SAFETY: `pointer` addresses `count` elements of `data_type` on this communicator's device and
            // stays alive until `run` has waited for the collective to finish.
            self.run(OP, |comm| unsafe {
                nccl::ncclAllReduce(pointer, pointer, count, data_type, reduction, comm, std::ptr::null_mut())
            })
        })
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        const OP: &str = "nccl broadcast";
        let data_type = self.check_tensor(OP, tensor)?;
        if root >= self.world_size {
            return Err(CommError::Invalid {
                op: OP,
                message: format!("root {root} is not in a group of {} ranks", self.world_size),
            });
        }
        if tensor.numel() == 0 {
            return Ok(());
        }
        self.in_place(OP, tensor, |buffer| {
            let (pointer, count) = (buffer.data_ptr(), buffer.numel());
            // SAFETY: as in all_reduce.
            self.run(OP, |comm| unsafe {
                nccl::ncclBroadcast(pointer, pointer, count, data_type, root as i32, comm, std::ptr::null_mut())
            })
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        const OP: &str = "nccl all_gather";
        let data_type = self.check_tensor(OP, tensor)?;
        let mut shape = vec![self.world_size as i64];
        shape.extend(tensor.size());
        let gathered = Tensor::f_empty(shape.as_slice(), (tensor.kind(), self.device))
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot allocate the result: {e}") })?;
        if tensor.numel() == 0 {
            return Ok(gathered);
        }
        let input = tensor.contiguous();
        let (source, target, count) = (input.data_ptr(), gathered.data_ptr(), input.numel());
        // SAFETY: `source` holds `count` elements and `target` `world_size * count`, both on this device and
        // alive until the collective has finished.
        self.run(OP, |comm| unsafe {
            nccl::ncclAllGather(source, target, count, data_type, comm, std::ptr::null_mut())
        })?;
        Ok(gathered)
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "nccl barrier";
        self.check_usable(OP)?;
        let token = Tensor::f_zeros([1], (Kind::Float, self.device))
            .map_err(|e| CommError::Invalid { op: OP, message: format!("cannot allocate the token: {e}") })?;
        let pointer = token.data_ptr();
        // SAFETY: one f32 on this device, alive until the collective has finished.
        self.run(OP, |comm| unsafe {
            nccl::ncclAllReduce(
                pointer,
                pointer,
                1,
                nccl::ncclDataType_t::ncclFloat32,
                nccl::ncclRedOp_t::ncclSum,
                comm,
                std::ptr::null_mut(),
            )
        })
    }

    /// A new NCCL communicator among the ranks that pass the same `color` (ncclCommSplit is not in
    /// cudarc's bindings for this CUDA version): the group's lowest rank publishes a fresh unique id.
    fn split(&self, color: usize) -> Result<Box<dyn Communicator>> {
        const OP: &str = "nccl split";
        self.check_usable(OP)?;
        let split_index = self.splits.get() + 1;
        self.splits.set(split_index);
        let base = format!("{}/split{split_index}", self.prefix);
        let read_color = |key: &str, peer| {
            self.store.get_within(key, self.timeout)?.ok_or(CommError::Timeout {
                op: OP,
                peer,
                timeout_s: self.timeout.as_secs_f64(),
            })
        };
        let group = Members::of_color(OP, &self.store, &base, color, self.rank, &self.global_ranks, read_color)?;
        let communicator = NcclCommunicator::build(
            self.store.clone(),
            format!("{base}/color{color}"),
            group,
            self.device,
            self.context.clone(),
            self.timeout,
        )?;
        Ok(Box::new(communicator))
    }
}

/// Rank 0 of the group creates the unique id and publishes it; the others wait for it in the store.
fn exchange_unique_id(
    store: &StoreClient,
    prefix: &str,
    rank: usize,
    global_ranks: &[usize],
    timeout: Duration,
) -> Result<nccl::ncclUniqueId> {
    let key = format!("{prefix}/unique_id");
    if rank == 0 {
        let unique_id = cudarc::nccl::result::get_uniqueid().map_err(|e| CommError::Invalid {
            op: "nccl init",
            message: format!("ncclGetUniqueId: {}", describe_result(e.0, None)),
        })?;
        let bytes: Vec<u8> = unique_id.internal.iter().map(|&byte| byte as u8).collect();
        store.set(&key, &bytes)?;
        return Ok(unique_id);
    }
    let bytes = store.get_within(&key, timeout)?.ok_or(CommError::Timeout {
        op: "nccl init (waiting for the unique id)",
        peer: global_ranks[0],
        timeout_s: timeout.as_secs_f64(),
    })?;
    if bytes.len() != UNIQUE_ID_BYTES {
        return Err(CommError::Invalid {
            op: "nccl init",
            message: format!("store key {key} holds {} bytes, not a {UNIQUE_ID_BYTES}-byte NCCL id", bytes.len()),
        });
    }
    let mut unique_id = nccl::ncclUniqueId { internal: [0; UNIQUE_ID_BYTES] };
    for (slot, byte) in unique_id.internal.iter_mut().zip(bytes) {
        *slot = byte as std::ffi::c_char;
    }
    Ok(unique_id)
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`, so that init and collectives can be given a deadline.
fn nonblocking_config() -> nccl::ncclConfig_t {
    nccl::ncclConfig_t {
        size: std::mem::size_of::<nccl::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: CONFIG_UNDEF_INT,
        minCTAs: CONFIG_UNDEF_INT,
        maxCTAs: CONFIG_UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: CONFIG_UNDEF_INT,
        trafficClass: CONFIG_UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: CONFIG_UNDEF_INT,
        CTAPolicy: CONFIG_UNDEF_INT,
        shrinkShare: CONFIG_UNDEF_INT,
        nvlsCTAs: CONFIG_UNDEF_INT,
        nChannelsPerNetPeer: CONFIG_UNDEF_INT,
        nvlinkCentricSched: CONFIG_UNDEF_INT,
    }
}

/// The NCCL element type of a tch kind, where NCCL has one.
pub fn nccl_type(kind: Kind) -> Option<nccl::ncclDataType_t> {
    use nccl::ncclDataType_t::*;
    Some(match kind {
        Kind::Float => ncclFloat32,
        Kind::Double => ncclFloat64,
        Kind::BFloat16 => ncclBfloat16,
        Kind::Half => ncclFloat16,
        Kind::Int64 => ncclInt64,
        Kind::Int => ncclInt32,
        Kind::Int8 => ncclInt8,
        Kind::Uint8 => ncclUint8,
        _ => return None,
    })
}

/// Spin briefly (collectives on one node finish in microseconds), then poll with short sleeps.
fn pause(started: Instant) {
    if started.elapsed() < SPIN_PHASE {
        std::thread::yield_now();
    } else {
        std::thread::sleep(POLL_SLEEP);
    }
}

fn describe_result(result: nccl::ncclResult_t, comm: Option<nccl::ncclComm_t>) -> String {
    // SAFETY: NCCL returns static or thread-local NUL-terminated strings (or NULL).
    let text = |pointer: *const std::ffi::c_char| {
        (!pointer.is_null()).then(|| unsafe { CStr::from_ptr(pointer) }.to_string_lossy().into_owned())
    };
    let summary = text(unsafe { nccl::ncclGetErrorString(result) }).unwrap_or_default();
    let detail = comm.and_then(|comm| text(unsafe { nccl::ncclGetLastError(comm) })).filter(|d| !d.is_empty());
    match detail {
        Some(detail) => format!("{result:?} ({summary}): {detail}"),
        None => format!("{result:?} ({summary})"),
    }
}

fn describe_driver(error: DriverError) -> String {
    match error.error_string() {
        Ok(text) => format!("{:?} ({})", error.0, text.to_string_lossy()),
        Err(_) => format!("{:?}", error.0),
    }
}
