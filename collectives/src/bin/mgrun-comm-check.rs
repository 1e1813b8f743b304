//! Test and benchmark worker for the communicators: one process per rank, configured like a torchrun
//! worker (the rank environment, `mgrun_collectives::RankEnv`: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
//! MGRUN_STORE_TOKEN, optionally MGRUN_COMM_TIMEOUT_S, default 30). Each rank builds deterministic
//! inputs for every rank, runs the collectives and compares with a sequentially computed reference.
//!
//! Usage: mgrun-comm-check <correctness|device-correctness|fail [victim] [die|stall]|bench [max_bytes] [json_out]>
//!        mgrun-comm-check launch <ranks> <worker args...>   (hosts the store and spawns the ranks)
//! `correctness` checks the TCP backend on CPU tensors in depth. `device-correctness` and `fail` run on
//! the rank's device (MGRUN_DEVICE=cuda: GPU LOCAL_RANK) with the backend of MGRUN_CHECK_BACKEND
//! (`auto`: NCCL on GPUs, TCP on CPUs), for every dtype the backend reduces.
//! Prints `OK ...` lines and exits 0 when every check passed; prints `FAIL ...` and exits 1 otherwise.

use anyhow::{bail, ensure, Context, Result};
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::tcp::{TcpCommunicator, TcpOptions};
use mgrun_collectives::{all_reduce_flat, scalars, Backend, BackendChoice, Communicator, RankEnv, ReduceOp};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// A value in [-15.625, 15.625] that is a multiple of 1/64: sums of up to 4 of them are exact in f32,
/// so ring and sequential reductions agree bit for bit in any order.
fn input_value(rank: usize, case: u64, index: usize) -> f64 {
    let mut x = (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ case.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (index as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    ((x % 2001) as f64 - 1000.0) / 64.0
}

fn inputs(rank: usize, case: u64, len: usize) -> Vec<f64> {
    (0..len).map(|i| input_value(rank, case, i)).collect()
}

fn to_tensor(values: &[f64], kind: Kind) -> Tensor {
    Tensor::from_slice(values).to_kind(kind)
}

/// The reference: reduce every member's input sequentially.
fn expected(members: &[usize], case: u64, len: usize, op: ReduceOp) -> Vec<f64> {
    let mut out = inputs(members[0], case, len);
    for &member in &members[1..] {
        for (o, v) in out.iter_mut().zip(inputs(member, case, len)) {
            *o = match op {
                ReduceOp::Sum | ReduceOp::Avg => *o + v,
                ReduceOp::Max => o.max(v),
            };
        }
    }
    if op == ReduceOp::Avg {
        for o in &mut out {
            *o /= members.len() as f64;
        }
    }
    out
}

/// Compares after rounding the reference to the tensor's dtype (the ring result is exact before the
/// division of Avg, and the division is correctly rounded in both).
fn check_equal(what: &str, got: &Tensor, want: &[f64]) -> Result<()> {
    ensure!(got.numel() == want.len(), "{what}: {} elements, want {}", got.numel(), want.len());
    let want = to_tensor(want, got.kind());
    let got_flat = got.reshape([-1]).to_kind(Kind::Double);
    let want_flat = want.to_kind(Kind::Double);
    let mismatches = got_flat.ne_tensor(&want_flat).sum(Kind::Int64).int64_value(&[]);
    if mismatches > 0 {
        let first = got_flat.ne_tensor(&want_flat).nonzero().int64_value(&[0, 0]);
        bail!(
            "{what}: {mismatches} of {} elements differ; first at {first}: got {} want {}",
            want.numel(),
            got_flat.double_value(&[first]),
            want_flat.double_value(&[first])
        );
    }
    Ok(())
}

const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

fn check_all_reduce(
    comm: &dyn Communicator,
    members: &[usize],
    label: &str,
    sizes: &[usize],
    case0: u64,
) -> Result<u64> {
    let rank_global = members[comm.rank()];
    let mut case = case0;
    for &len in sizes {
        for kind in [Kind::Float, Kind::Double] {
            for op in OPS {
                // The largest size only for f32 sum, to keep the test fast.
                if len >= 5_000_000 && (kind != Kind::Float || op != ReduceOp::Sum) {
                    continue;
                }
                case += 1;
                let mut tensor = to_tensor(&inputs(rank_global, case, len), kind);
                comm.all_reduce(&mut tensor, op)?;
                check_equal(
                    &format!("{label} all_reduce {op:?} {kind:?} len {len}"),
                    &tensor,
                    &expected(members, case, len, op),
                )?;
            }
        }
    }
    Ok(case)
}

fn correctness(env: &RankEnv, timeout: Duration) -> Result<()> {
    let (rank, world) = (env.rank, env.world_size);
    let started = Instant::now();
    let store = StoreClient::connect_rank(env, timeout)?;
    let comm = TcpCommunicator::connect(&store, rank, world, Device::Cpu, timeout)?;
    ensure!(comm.rank() == rank && comm.world_size() == world && comm.backend() == "tcp");
    let everyone: Vec<usize> = (0..world).collect();

    // Default options: small sizes take the gather path, large ones the pipelined ring.
    let mut case = check_all_reduce(&comm, &everyone, "default", &[1, 7, 1000, 65_537, 1_000_000, 10_000_000], 0)?;
    println!("OK rank {rank} all_reduce default ({:.1} s)", started.elapsed().as_secs_f64());

    // A second world in the same job, forcing the ring for every size with tiny segments, so chunking,
    // empty chunks (len < world) and the pipelining dependencies are all exercised.
    let tiny = TcpOptions { segment_bytes: 64, small_bytes: 0, socket_buffer_bytes: None };
    let ring = TcpCommunicator::connect_with(&store, rank, world, Device::Cpu, timeout, tiny)?;
    case = check_all_reduce(&ring, &everyone, "ring/64B-segments", &[1, 3, 7, 1000, 65_537], case)?;
    let big_segments = TcpOptions { segment_bytes: 1 << 20, small_bytes: 0, socket_buffer_bytes: Some(1 << 20) };
    let ring_big = TcpCommunicator::connect_with(&store, rank, world, Device::Cpu, timeout, big_segments)?;
    case = check_all_reduce(&ring_big, &everyone, "ring/1MiB-segments", &[999_999], case)?;
    println!("OK rank {rank} all_reduce ring variants");

    // i64 sum and max.
    for op in [ReduceOp::Sum, ReduceOp::Max] {
        case += 1;
        let values: Vec<i64> = (0..5000).map(|i| (input_value(rank, case, i) * 64.0) as i64 * 1_000_003).collect();
        let mut tensor = Tensor::from_slice(&values);
        comm.all_reduce(&mut tensor, op)?;
        let mut want = vec![if op == ReduceOp::Sum { 0i64 } else { i64::MIN }; 5000];
        for r in 0..world {
            for (i, w) in want.iter_mut().enumerate() {
                let v = (input_value(r, case, i) * 64.0) as i64 * 1_000_003;
                *w = if op == ReduceOp::Sum { *w + v } else { (*w).max(v) };
            }
        }
        ensure!(Vec::<i64>::try_from(&tensor)? == want, "i64 all_reduce {op:?} differs");
    }
    let mut int_avg = Tensor::from_slice(&[1i64, 2]);
    ensure!(comm.all_reduce(&mut int_avg, ReduceOp::Avg).is_err(), "i64 Avg must be rejected");

    // Non-contiguous input: reduced through a host copy and written back into the tensor's storage.
    case += 1;
    let base = to_tensor(&inputs(rank, case, 300), Kind::Float).reshape([20, 15]);
    let mut transposed = base.tr();
    ensure!(!transposed.is_contiguous());
    comm.all_reduce(&mut transposed, ReduceOp::Sum)?;
    let want = expected(&everyone, case, 300, ReduceOp::Sum);
    check_equal("non-contiguous all_reduce (view)", &transposed.tr().contiguous(), &want)?;
    check_equal("non-contiguous all_reduce (storage)", &base, &want)?;

    // Bucketed flat reduction through narrow views writes into the flat buffer itself.
    case += 1;
    let mut flat = to_tensor(&inputs(rank, case, 100_003), Kind::Float);
    all_reduce_flat(&comm, &mut flat, ReduceOp::Avg, 40_000)?;
    check_equal("all_reduce_flat", &flat, &expected(&everyone, case, 100_003, ReduceOp::Avg))?;
    println!("OK rank {rank} i64, non-contiguous, flat buckets");

    // Broadcast from every root, with both communicators.
    for (label, c) in [("default", &comm as &dyn Communicator), ("ring", &ring)] {
        for root in 0..world {
            for len in [5usize, 300_001] {
                case += 1;
                let mut tensor = to_tensor(&inputs(rank, case, len), Kind::Double);
                c.broadcast(&mut tensor, root)?;
                check_equal(&format!("{label} broadcast root {root} len {len}"), &tensor, &inputs(root, case, len))?;
            }
        }
    }
    let mut scratch = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    ensure!(comm.broadcast(&mut scratch, world).is_err(), "broadcast from a root outside the group must fail");

    // All-gather: shape [world, ...] in rank order.
    for shape in [vec![3i64, 5], vec![100_000]] {
        case += 1;
        let len = shape.iter().product::<i64>() as usize;
        let mine = to_tensor(&inputs(rank, case, len), Kind::Float).reshape(shape.as_slice());
        let gathered = comm.all_gather(&mine)?;
        let mut want_shape = vec![world as i64];
        want_shape.extend(&shape);
        ensure!(gathered.size() == want_shape, "all_gather shape {:?}, want {want_shape:?}", gathered.size());
        for r in 0..world {
            check_equal(&format!("all_gather slot {r}"), &gathered.get(r as i64), &inputs(r, case, len))?;
        }
    }
    println!("OK rank {rank} broadcast, all_gather");

    // Host scalars through the helpers (evaluation counts, losses, the resume step).
    let sums = scalars::all_reduce_f64(&comm, &[rank as f64, 1.0], ReduceOp::Sum)?;
    ensure!(sums == [(world * (world - 1) / 2) as f64, world as f64], "scalar all_reduce gave {sums:?}");
    let step = scalars::broadcast_i64(&comm, &[if rank == world - 1 { 1234 } else { -1 }], world - 1)?;
    ensure!(step == [1234], "scalar broadcast gave {step:?}");
    let gathered = scalars::all_gather_f64(&comm, &[rank as f64, 2.0 * rank as f64])?;
    let want: Vec<Vec<f64>> = (0..world).map(|r| vec![r as f64, 2.0 * r as f64]).collect();
    ensure!(gathered == want, "scalar all_gather gave {gathered:?}");
    println!("OK rank {rank} scalars");

    // Barrier: rank 0 arrives late, nobody may leave before it arrives.
    for _ in 0..3 {
        comm.barrier()?;
    }
    if rank == 0 {
        std::thread::sleep(Duration::from_millis(400));
    }
    let waiting = Instant::now();
    comm.barrier()?;
    let waited = waiting.elapsed();
    if rank != 0 {
        ensure!(
            waited >= Duration::from_millis(300),
            "barrier released rank {rank} after {waited:?}, before rank 0 arrived"
        );
    }
    println!("OK rank {rank} barrier");

    // Split by parity, then reduce within each group; a second split (everyone together) and a split of
    // the split check that the store keys of successive splits do not collide.
    let halves = comm.split(rank % 2)?;
    let members: Vec<usize> = (0..world).filter(|r| r % 2 == rank % 2).collect();
    ensure!(halves.world_size() == members.len(), "split size {} want {}", halves.world_size(), members.len());
    ensure!(halves.rank() == rank / 2, "split rank {} want {}", halves.rank(), rank / 2);
    case = check_all_reduce(halves.as_ref(), &members, "split-by-parity", &[7, 65_537], case)?;
    let together = comm.split(7)?;
    ensure!(together.world_size() == world && together.rank() == rank);
    case = check_all_reduce(together.as_ref(), &everyone, "split-all", &[1000], case)?;
    let singles = halves.split(halves.rank())?;
    ensure!(singles.world_size() == 1 && singles.rank() == 0);
    case += 1;
    let mut alone = to_tensor(&inputs(rank, case, 10), Kind::Float);
    singles.all_reduce(&mut alone, ReduceOp::Sum)?;
    check_equal("split of a split (world of one)", &alone, &inputs(rank, case, 10))?;
    halves.barrier()?;
    println!("OK rank {rank} split");

    // Mismatched sizes are detected (on a throwaway world): every rank gets an error, nobody hangs.
    if world > 1 {
        let doomed = TcpCommunicator::connect(&store, rank, world, Device::Cpu, timeout)?;
        let mut tensor = Tensor::zeros([10 + (rank == 0) as i64], (Kind::Float, Device::Cpu));
        let start = Instant::now();
        let error = doomed.all_reduce(&mut tensor, ReduceOp::Sum).err().context("mismatched sizes went unnoticed")?;
        ensure!(start.elapsed() < timeout, "mismatch detected only after {:?}", start.elapsed());
        let again =
            doomed.all_reduce(&mut tensor, ReduceOp::Sum).err().context("a failed communicator kept working")?;
        println!("OK rank {rank} mismatch detected: {error} | then: {again}");
    }
    // The main world still works.
    comm.barrier()?;
    println!("OK rank {rank} all checks passed in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The victim dies (exits) or stalls (sleeps past the timeout) after one good all-reduce; the others
/// report how they failed and how long it took.
fn failure(env: &RankEnv, timeout: Duration, victim: usize, mode: &str) -> Result<()> {
    let rank = env.rank;
    let store = StoreClient::connect_rank(env, timeout)?;
    let comm = connect_on_device(env, &store, timeout)?;
    let mut tensor = Tensor::ones([200_000], (Kind::Float, comm.device()));
    comm.all_reduce(&mut tensor, ReduceOp::Sum)?;
    if rank == victim {
        match mode {
            "die" => std::process::exit(3),
            _ => {
                std::thread::sleep(timeout * 3);
                std::process::exit(0);
            }
        }
    }
    let start = Instant::now();
    let outcome = comm.all_reduce(&mut tensor, ReduceOp::Sum).and_then(|_| comm.all_reduce(&mut tensor, ReduceOp::Sum));
    let elapsed_ms = start.elapsed().as_millis();
    match outcome {
        Ok(()) => bail!("rank {rank}: all_reduce succeeded although rank {victim} is gone"),
        Err(error) => {
            let kind = match &error {
                mgrun_collectives::CommError::PeerLost { peer, .. } => format!("PeerLost peer={peer}"),
                mgrun_collectives::CommError::Timeout { peer, .. } => format!("Timeout peer={peer}"),
                other => format!("Other {other:?}"),
            };
            println!("RESULT rank={rank} elapsed_ms={elapsed_ms} kind={kind} error={error}");
        }
    }
    Ok(())
}

/// This rank's communicator on its device, with the backend MGRUN_CHECK_BACKEND asks for.
fn connect_on_device(env: &RankEnv, store: &StoreClient, timeout: Duration) -> Result<Box<dyn Communicator>> {
    let device = env.assigned_device();
    let requested = std::env::var("MGRUN_CHECK_BACKEND").unwrap_or_else(|_| "auto".to_string());
    let requested: BackendChoice = requested.parse().context("MGRUN_CHECK_BACKEND")?;
    let backend = Backend::select(requested, device, env.ranks_per_gpu)?;
    Ok(mgrun_collectives::connect(backend, store, env.rank, env.world_size, device, timeout)?)
}

/// An integer-valued input in [-8, 8]: sums over up to 32 ranks are exact in every dtype (bf16 holds
/// integers up to 256 exactly), so any reduction order must give the reference bit for bit.
fn small_integer(rank: usize, case: u64, index: usize) -> f64 {
    (input_value(rank, case, index) / 2.0).round().clamp(-8.0, 8.0)
}

/// Every collective on the rank's device against a sequential reference, for every dtype the backend
/// reduces: all-reduce (sum, avg for f32/f64, max), broadcast from every root, all-gather, a split
/// into parity groups, the scalar helpers and a barrier.
fn device_correctness(env: &RankEnv, timeout: Duration) -> Result<()> {
    let (rank, world) = (env.rank, env.world_size);
    let started = Instant::now();
    let store = StoreClient::connect_rank(env, timeout)?;
    let comm = connect_on_device(env, &store, timeout)?;
    let device = comm.device();
    let kinds: &[Kind] = match comm.backend() {
        "nccl" => &[Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half, Kind::Int64],
        _ => &[Kind::Float, Kind::Double, Kind::Int64],
    };
    let values =
        |r: usize, case: u64, len: usize| -> Vec<f64> { (0..len).map(|i| small_integer(r, case, i)).collect() };
    let mut case = 1000u64;
    for &kind in kinds {
        for len in [1usize, 1000, (1 << 20) + 3] {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                // Avg divides: exact only where the quotient is representable, so f32 and f64 only.
                if op == ReduceOp::Avg && !matches!(kind, Kind::Float | Kind::Double) {
                    continue;
                }
                case += 1;
                let mut tensor = to_tensor(&values(rank, case, len), kind).to_device(device);
                comm.all_reduce(&mut tensor, op).with_context(|| format!("all_reduce {op:?} {kind:?} len {len}"))?;
                let mut want = values(0, case, len);
                for r in 1..world {
                    for (w, v) in want.iter_mut().zip(values(r, case, len)) {
                        *w = if op == ReduceOp::Max { w.max(v) } else { *w + v };
                    }
                }
                if op == ReduceOp::Avg {
                    want.iter_mut().for_each(|w| *w /= world as f64);
                }
                check_equal(&format!("all_reduce {op:?} {kind:?} len {len}"), &tensor.to_device(Device::Cpu), &want)?;
            }
            for root in 0..world {
                case += 1;
                let mut tensor = to_tensor(&values(rank, case, len), kind).to_device(device);
                comm.broadcast(&mut tensor, root)?;
                check_equal(
                    &format!("broadcast {kind:?} root {root}"),
                    &tensor.to_device(Device::Cpu),
                    &values(root, case, len),
                )?;
            }
            case += 1;
            let gathered = comm.all_gather(&to_tensor(&values(rank, case, len), kind).to_device(device))?;
            ensure!(gathered.device() == device, "all_gather returned a tensor on {:?}", gathered.device());
            for r in 0..world {
                check_equal(
                    &format!("all_gather {kind:?} slot {r}"),
                    &gathered.get(r as i64).to_device(Device::Cpu),
                    &values(r, case, len),
                )?;
            }
        }
        println!("OK rank {rank} {kind:?}: all_reduce, broadcast, all_gather on {device:?} ({})", comm.backend());
    }
    // Host tensors break the device rule on a GPU communicator.
    if device != Device::Cpu {
        let error = comm.all_reduce(&mut Tensor::ones([4], (Kind::Float, Device::Cpu)), ReduceOp::Sum).err();
        ensure!(
            matches!(error, Some(mgrun_collectives::CommError::WrongDevice { .. })),
            "a host tensor was accepted: {error:?}"
        );
    }
    let sums = scalars::all_reduce_f64(comm.as_ref(), &[rank as f64, 1.0], ReduceOp::Sum)?;
    ensure!(sums == [(world * (world - 1) / 2) as f64, world as f64], "scalar all_reduce gave {sums:?}");
    // The domain-group split: parity groups, each reducing its members' inputs.
    let halves = comm.split(rank % 2)?;
    let members: Vec<usize> = (0..world).filter(|r| r % 2 == rank % 2).collect();
    ensure!(halves.world_size() == members.len() && halves.rank() == rank / 2, "split layout");
    case += 1;
    let mut tensor = to_tensor(&values(rank, case, 4097), Kind::Float).to_device(device);
    halves.all_reduce(&mut tensor, ReduceOp::Sum)?;
    let mut want = vec![0.0; 4097];
    for &m in &members {
        for (w, v) in want.iter_mut().zip(values(m, case, 4097)) {
            *w += v;
        }
    }
    check_equal("split all_reduce", &tensor.to_device(Device::Cpu), &want)?;
    halves.barrier()?;
    comm.barrier()?;
    println!(
        "OK rank {rank} split, scalars, barrier; all device checks passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A minimal stand-in for `mgrun`'s launcher: hosts the store on loopback and runs `ranks` copies of this
/// binary with `args` and the rank environment; fails if any rank fails. The device variables
/// (MGRUN_DEVICE, MGRUN_RANKS_PER_GPU) and MGRUN_COMM_TIMEOUT_S are taken from this process's
/// environment; CUDA rank r computes on GPU r.
fn launch(ranks: usize, args: &[String]) -> Result<()> {
    let token = format!("{:032x}", rand::random::<u128>());
    let server = mgrun_collectives::store::StoreServer::start("127.0.0.1:0".parse()?, token.clone())?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let here = RankEnv::from_env().context("reading the device of the ranks from this process's environment")?;
    let mut children = Vec::new();
    for rank in 0..ranks {
        let env = RankEnv {
            rank,
            local_rank: rank,
            world_size: ranks,
            local_world_size: ranks,
            master_addr: Some("127.0.0.1".to_string()),
            master_port: Some(server.addr().port()),
            store_token: Some(token.clone()),
            device_kind: here.device_kind,
            cuda_device: rank,
            ranks_per_gpu: here.ranks_per_gpu,
            comm_timeout: here.comm_timeout,
            ..RankEnv::single_rank()
        };
        let child = std::process::Command::new(&exe)
            .args(args)
            .envs(env.vars())
            .spawn()
            .with_context(|| format!("spawning rank {rank}"))?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child.wait().with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() {
            failed.push(format!("rank {rank}: {status}"));
        }
    }
    ensure!(failed.is_empty(), "ranks failed: {}", failed.join(", "));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("launch") {
        let outcome = args
            .get(2)
            .and_then(|n| n.parse::<usize>().ok())
            .context("usage: mgrun-comm-check launch <ranks> <worker args...>")
            .and_then(|ranks| launch(ranks, &args[3..]));
        if let Err(error) = outcome {
            eprintln!("FAIL launch: {error:#}");
            std::process::exit(1);
        }
        return;
    }
    let outcome = (|| -> Result<()> {
        let env = RankEnv::from_launcher_env()?;
        let timeout = env.comm_timeout.unwrap_or(Duration::from_secs(30));
        match args.get(1).map(String::as_str) {
            Some("correctness") => correctness(&env, timeout),
            Some("device-correctness") => device_correctness(&env, timeout),
            Some("fail") => {
                let victim = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(env.world_size - 1);
                failure(&env, timeout, victim, args.get(3).map(String::as_str).unwrap_or("die"))
            }
            Some("bench") => {
                let max_bytes = args.get(2).and_then(|v| v.parse().ok()).unwrap_or(64 << 20);
                mgrun_collectives::bench::bench_worker_main(max_bytes, args.get(3).map(std::path::Path::new))
            }
            _ => bail!(
                "usage: mgrun-comm-check <correctness|device-correctness|fail [victim] [die|stall]|bench [max_bytes] \
                 [json_out]>"
            ),
        }
    })();
    if let Err(error) = outcome {
        println!("FAIL rank {}: {error:#}", std::env::var(mgrun_collectives::rank_env::var::RANK).unwrap_or_default());
        std::process::exit(1);
    }
}
