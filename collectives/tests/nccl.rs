//! The NCCL backend and backend selection.
//!
//! Selection tests run everywhere. The CUDA tests are `#[ignore]`d, so that a machine without a GPU
//! lists them as ignored by name instead of passing them; `scripts/gpu-check.sh` runs them with
//! `--ignored`, and there they fail if CUDA is missing. They run at world size 1 for NCCL, since NCCL
//! refuses two ranks on one GPU (scripts/multi-gpu-check.sh covers more GPUs): results are checked
//! against values computed on the CPU, including on views with a storage offset, after GPU work queued
//! just before the collective (stream ordering), and a two-rank world whose second rank never joins must
//! time out and abort instead of hanging. The TCP backend on CUDA tensors (pinned host staging) runs
//! three ranks as threads on one GPU. They need `libnccl.so` on LD_LIBRARY_PATH
//! (shared/device/gpu-env.sh makes it; `mgrun` does it for its ranks).

use mgrun_collectives::nccl::{nccl_library_status, nccl_version, NcclCommunicator};
use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::{all_reduce_flat, Backend, BackendChoice, CommError, Communicator, ReduceOp};
use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const TOKEN: &str = "nccl-test-token";
/// NCCL communicators of one process share the GPU: the CUDA tests run one at a time.
static GPU: Mutex<()> = Mutex::new(());

fn store() -> (StoreServer, StoreClient) {
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), TOKEN.to_string()).unwrap();
    let client = StoreClient::connect(&server.addr().to_string(), TOKEN, Duration::from_secs(10)).unwrap();
    (server, client)
}

/// Why the CUDA tests are ignored on machines without a GPU.
const NEEDS_CUDA: &str = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it with --ignored";

/// Loads libtorch's CUDA backend (the linker drops it, see launcher/src/cuda.rs) and returns the GPU;
/// fails the test when there is none (these tests only run when asked for, on a GPU machine).
fn cuda_device() -> Device {
    let lib = match option_env!("MGRUN_LIBTORCH_LIB") {
        Some(dir) => format!("{dir}/libtorch_cuda.so"),
        None => "libtorch_cuda.so".to_string(),
    };
    for candidate in [lib.as_str(), "libtorch_cuda.so"] {
        let path = std::ffi::CString::new(candidate).unwrap();
        // SAFETY: a valid C string; the handle is leaked on purpose (the library stays loaded).
        if !unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null() {
            break;
        }
    }
    assert!(tch::Cuda::is_available(), "CUDA is not available: this test {NEEDS_CUDA}");
    if let Err(why) = nccl_library_status() {
        panic!("CUDA is available but NCCL is not: {why}");
    }
    Device::Cuda(0)
}

fn connect_one(store: &StoreClient, device: Device) -> NcclCommunicator {
    NcclCommunicator::connect(store, 0, 1, device, Duration::from_secs(60)).expect("NCCL world of one")
}

#[test]
fn auto_picks_nccl_on_cuda_and_tcp_on_cpu() {
    assert_eq!(Backend::select(BackendChoice::Auto, Device::Cpu, 1).unwrap(), Backend::Tcp);
    assert_eq!(Backend::select(BackendChoice::Auto, Device::Cuda(0), 1).unwrap(), Backend::Nccl);
    assert_eq!(Backend::select(BackendChoice::Auto, Device::Cuda(3), 1).unwrap(), Backend::Nccl);
    assert_eq!(Backend::select(BackendChoice::Tcp, Device::Cuda(0), 1).unwrap(), Backend::Tcp);
    assert_eq!(Backend::select(BackendChoice::Nccl, Device::Cuda(1), 1).unwrap(), Backend::Nccl);
    let unknown = "mpi".parse::<BackendChoice>().unwrap_err().to_string();
    assert!(unknown.contains("\"mpi\""), "{unknown}");
}

#[test]
fn shared_gpus_use_tcp_and_refuse_nccl() {
    assert_eq!(Backend::select(BackendChoice::Auto, Device::Cuda(0), 3).unwrap(), Backend::Tcp);
    assert_eq!(Backend::select(BackendChoice::Tcp, Device::Cuda(0), 3).unwrap(), Backend::Tcp);
    let message = Backend::select(BackendChoice::Nccl, Device::Cuda(0), 3).unwrap_err().to_string();
    assert!(message.contains("NCCL refuses two ranks") && message.contains("--ranks-per-gpu"), "{message}");
    assert!(message.contains("\"tcp\""), "{message}");
}

#[test]
fn nccl_on_cpu_is_refused_clearly() {
    let message = Backend::select(BackendChoice::Nccl, Device::Cpu, 1).unwrap_err().to_string();
    assert!(message.contains("comm.backend") && message.contains("CUDA"), "{message}");
    assert!(message.contains("--gpus") && message.contains("\"tcp\""), "{message}");

    // The communicator itself refuses CPU devices before touching any CUDA or NCCL library, so this
    // cannot panic on a machine without them.
    let (_server, client) = store();
    let error = NcclCommunicator::connect(&client, 0, 1, Device::Cpu, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(error, CommError::Invalid { .. }), "{error}");
    assert!(error.to_string().contains("needs a CUDA device"), "{error}");
    let error = NcclCommunicator::connect(&client, 2, 2, Device::Cuda(0), Duration::from_secs(5)).unwrap_err();
    assert!(error.to_string().contains("rank 2 is not in a world of 2"), "{error}");
}

#[test]
fn library_probe_never_panics() {
    // On a CPU machine this reports what is missing; on a GPU machine with gpu-env.sh it succeeds.
    match nccl_library_status() {
        Ok(()) => println!("NCCL {}", nccl_version().expect("version of a loadable NCCL")),
        Err(why) => {
            assert!(why.contains("libcuda") || why.contains("libnccl.so"), "{why}");
            assert!(nccl_version().is_err());
        }
    }
}

/// Kinds NCCL reduces, with a tolerance for comparing against the CPU reference.
const KINDS: [Kind; 5] = [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half, Kind::Int64];

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it with --ignored"]
fn collectives_on_cuda_tensors() {
    let _gpu = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = cuda_device();
    println!("NCCL {}", nccl_version().unwrap());
    let (_server, client) = store();
    let comm = connect_one(&client, device);
    assert_eq!((comm.rank(), comm.world_size(), comm.backend()), (0, 1, "nccl"));

    for kind in KINDS {
        // Reference on the CPU; on the GPU the input comes out of a kernel queued just before the
        // collective, and the result feeds one queued just after, so stream ordering is exercised.
        let base = Tensor::arange(1000, (Kind::Int64, Device::Cpu)).remainder(97).to_kind(kind);
        let expected = (&base * 3 + 1).to_kind(Kind::Double);
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let mut tensor = base.to_device(device) * 3;
            comm.all_reduce(&mut tensor, op).unwrap_or_else(|e| panic!("{kind:?} {op:?}: {e}"));
            let after = (tensor + 1).to_device(Device::Cpu).to_kind(Kind::Double);
            assert!(after.equal(&expected), "all_reduce {op:?} on {kind:?}");
        }
        let mut tensor = base.to_device(device) * 3;
        comm.broadcast(&mut tensor, 0).unwrap();
        assert!((tensor + 1).to_device(Device::Cpu).to_kind(Kind::Double).equal(&expected), "broadcast {kind:?}");
        let gathered = comm.all_gather(&(base.to_device(device) * 3).view([10, 100])).unwrap();
        assert_eq!(gathered.size(), [1, 10, 100]);
        assert!(
            (gathered + 1).to_device(Device::Cpu).to_kind(Kind::Double).view([-1]).equal(&expected),
            "all_gather {kind:?}"
        );
    }
    comm.barrier().unwrap();

    // Views: a storage offset (as in bucketed reduction) and a non-contiguous tensor.
    let flat = Tensor::arange(4096, (Kind::Float, device));
    let window = flat.narrow(0, 1000, 512);
    let gathered = comm.all_gather(&window).unwrap();
    assert!(gathered.view([-1]).equal(&Tensor::arange_start(1000, 1512, (Kind::Float, device))), "offset view");
    let mut transposed = Tensor::arange(12, (Kind::Float, device)).view([3, 4]).transpose(0, 1);
    comm.all_reduce(&mut transposed, ReduceOp::Sum).unwrap();
    assert!(transposed.equal(&Tensor::arange(12, (Kind::Float, device)).view([3, 4]).transpose(0, 1)));

    // Misuse is an error, not a crash.
    let error = comm.all_reduce(&mut Tensor::ones([4], (Kind::Float, Device::Cpu)), ReduceOp::Sum).unwrap_err();
    assert!(matches!(error, CommError::WrongDevice { .. }), "{error}");
    assert!(error.to_string().contains("Cpu") && error.to_string().contains("rank 0"), "{error}");
    let error = comm.all_reduce(&mut Tensor::ones([4], (Kind::Bool, device)), ReduceOp::Sum).unwrap_err();
    assert!(error.to_string().contains("Bool"), "{error}");
    assert!(comm.broadcast(&mut Tensor::ones([4], (Kind::Float, device)), 1).is_err());

    // A split gives a working communicator of its own (fresh unique id through the store).
    let group = comm.split(7).unwrap();
    assert_eq!((group.rank(), group.world_size(), group.backend()), (0, 1, "nccl"));
    let mut tensor = Tensor::full([8], 2.5, (Kind::Float, device));
    group.all_reduce(&mut tensor, ReduceOp::Max).unwrap();
    assert!(tensor.equal(&Tensor::full([8], 2.5, (Kind::Float, device))));
    group.barrier().unwrap();
    comm.barrier().unwrap();
}

/// Pretends to be a larger world so that [`all_reduce_flat`] does not skip the work, and counts the
/// collectives it issues on the real (one-rank) NCCL communicator.
struct Counting<'a> {
    inner: &'a NcclCommunicator,
    calls: Cell<usize>,
}

// SAFETY (of the test): used from one thread only.
unsafe impl Send for Counting<'_> {}

impl Communicator for Counting<'_> {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        2
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> mgrun_collectives::Result<()> {
        self.calls.set(self.calls.get() + 1);
        self.inner.all_reduce(tensor, op)
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> mgrun_collectives::Result<()> {
        self.inner.broadcast(tensor, root)
    }
    fn all_gather(&self, tensor: &Tensor) -> mgrun_collectives::Result<Tensor> {
        self.inner.all_gather(tensor)
    }
    fn barrier(&self) -> mgrun_collectives::Result<()> {
        self.inner.barrier()
    }
    fn split(&self, color: usize) -> mgrun_collectives::Result<Box<dyn Communicator>> {
        self.inner.split(color)
    }
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it with --ignored"]
fn bucketed_flat_all_reduce_on_cuda() {
    let _gpu = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = cuda_device();
    let (_server, client) = store();
    let comm = connect_one(&client, device);
    // ResNet-50's gradient size: 25.6 M f32 parameters in one flat buffer, 25 MB buckets.
    let numel: i64 = 25_557_032;
    let bucket_bytes = 25 << 20;
    let mut flat = Tensor::randn([numel], (Kind::Float, device));
    let expected = flat.copy();
    let counting = Counting { inner: &comm, calls: Cell::new(0) };
    all_reduce_flat(&counting, &mut flat, ReduceOp::Avg, bucket_bytes).unwrap();
    let buckets = (numel as usize * 4).div_ceil(bucket_bytes);
    assert_eq!(counting.calls.get(), buckets, "one collective per bucket");
    assert!(flat.equal(&expected));

    // The call overhead of a one-rank NCCL all-reduce per bucket (no data moves between GPUs here).
    let rounds = 20;
    tch::Cuda::synchronize(0);
    let started = Instant::now();
    for _ in 0..rounds {
        all_reduce_flat(&counting, &mut flat, ReduceOp::Sum, bucket_bytes).unwrap();
    }
    let per_call = started.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "all_reduce_flat of {:.1} MB in {buckets} buckets on one GPU: {:.3} ms per call",
        numel as f64 * 4.0 / 1e6,
        per_call * 1e3
    );
}

#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it with --ignored"]
fn a_rank_that_never_joins_times_out_and_aborts() {
    let _gpu = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = cuda_device();
    let (_server, client) = store();
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    // Rank 0 of two: publishes the id, starts NCCL's init and waits for rank 1, which never comes.
    let error = NcclCommunicator::connect(&client, 0, 2, device, timeout).unwrap_err();
    let elapsed = started.elapsed();
    println!("rank 0 of 2 alone: {error} after {:.2} s", elapsed.as_secs_f64());
    assert!(matches!(error, CommError::Timeout { peer: 1, .. }), "{error}");
    assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(15), "{elapsed:?}");
    // Rank 1 of two waits for rank 0's id in a fresh store and gives up naming rank 0.
    let (_other_server, other_client) = store();
    let error = NcclCommunicator::connect(&other_client, 1, 2, device, timeout).unwrap_err();
    assert!(matches!(error, CommError::Timeout { peer: 0, .. }), "{error}");
    // The process is still healthy: a new communicator works.
    let comm = connect_one(&client, device);
    let mut tensor = Tensor::ones([16], (Kind::Float, device));
    comm.all_reduce(&mut tensor, ReduceOp::Sum).unwrap();
    assert!(tensor.equal(&Tensor::ones([16], (Kind::Float, device))));
}

/// The TCP backend on CUDA tensors: three ranks (threads) sharing one GPU, as `--ranks-per-gpu 3` runs
/// them, against a sequential CPU reference, for every dtype the ring reduces.
#[test]
#[ignore = "needs a CUDA GPU and NCCL: scripts/gpu-check.sh runs it with --ignored"]
fn tcp_backend_on_cuda_tensors_through_pinned_staging() {
    let _gpu = GPU.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let device = cuda_device();
    let (_server, client) = store();
    const WORLD: usize = 3;
    let results: Vec<std::thread::Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WORLD)
            .map(|rank| {
                let client = client.try_clone().unwrap();
                scope.spawn(move || {
                    let comm = TcpCommunicator::connect(&client, rank, WORLD, device, Duration::from_secs(60)).unwrap();
                    assert_eq!(comm.device(), device);
                    // Every rank holds rank + 1 times a ramp; large enough for the pipelined ring path.
                    let ramp =
                        |kind: Kind| Tensor::arange(100_000, (Kind::Int64, Device::Cpu)).remainder(89).to_kind(kind);
                    for kind in [Kind::Float, Kind::Double, Kind::Int64] {
                        let mut tensor = (ramp(kind) * (rank as i64 + 1)).to_device(device);
                        comm.all_reduce(&mut tensor, ReduceOp::Sum).unwrap();
                        assert_eq!(tensor.device(), device);
                        let expected = ramp(kind) * 6;
                        assert!(tensor.to_device(Device::Cpu).equal(&expected), "tcp all_reduce {kind:?} on CUDA");
                        let mut tensor = (ramp(kind) * (rank as i64 + 1)).to_device(device);
                        comm.broadcast(&mut tensor, 2).unwrap();
                        assert!(tensor.to_device(Device::Cpu).equal(&(ramp(kind) * 3)), "tcp broadcast {kind:?}");
                        let gathered = comm.all_gather(&(ramp(kind) * (rank as i64 + 1)).to_device(device)).unwrap();
                        assert_eq!((gathered.device(), gathered.size()), (device, vec![3, 100_000]));
                        for r in 0..WORLD {
                            let expected = ramp(kind) * (r as i64 + 1);
                            assert!(gathered.get(r as i64).to_device(Device::Cpu).equal(&expected), "tcp all_gather");
                        }
                    }
                    let error = comm.all_reduce(&mut Tensor::ones([4], (Kind::Float, Device::Cpu)), ReduceOp::Sum);
                    assert!(matches!(error, Err(CommError::WrongDevice { .. })), "{error:?}");
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    for (rank, result) in results.into_iter().enumerate() {
        assert!(result.is_ok(), "rank {rank} failed");
    }
}
