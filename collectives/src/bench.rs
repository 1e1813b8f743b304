//! All-reduce benchmark in the style of nccl-tests: time per call, algbw = bytes / time and
//! busbw = algbw * 2(n-1)/n (the all-reduce bus factor), for message sizes 1 KiB .. `max_bytes`.

use crate::store::StoreClient;
use crate::{CommError, Communicator, RankEnv, ReduceOp};
use anyhow::Context;
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// What [`run_comm_bench`] measures.
#[derive(Debug, Clone, PartialEq)]
pub struct CommBenchOptions {
    pub min_bytes: usize,
    /// Largest message (inclusive); sizes grow by `growth` from `min_bytes`.
    pub max_bytes: usize,
    pub growth: usize,
    /// Roughly how many bytes each size moves in its timed iterations (fewer iterations for big sizes).
    pub bytes_per_size: usize,
    pub min_iterations: usize,
    pub max_iterations: usize,
    pub warmup_iterations: usize,
    /// Where the messages live: CPU for the TCP backend, a CUDA device for NCCL.
    pub device: Device,
}

impl Default for CommBenchOptions {
    fn default() -> Self {
        CommBenchOptions {
            min_bytes: 1 << 10,
            max_bytes: 256 << 20,
            growth: 4,
            bytes_per_size: 512 << 20,
            min_iterations: 3,
            max_iterations: 50,
            warmup_iterations: 2,
            device: Device::Cpu,
        }
    }
}

impl CommBenchOptions {
    /// The message sizes measured, in bytes.
    pub fn sizes(&self) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut bytes = self.min_bytes.max(4);
        while bytes <= self.max_bytes {
            sizes.push(bytes);
            bytes = bytes.saturating_mul(self.growth.max(2));
        }
        sizes
    }

    /// Timed iterations for a message of `bytes`.
    pub fn iterations(&self, bytes: usize) -> usize {
        (self.bytes_per_size / bytes.max(1)).clamp(self.min_iterations, self.max_iterations)
    }
}

/// One measured message size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommBenchRow {
    pub bytes: usize,
    pub elements: usize,
    pub iterations: usize,
    /// Mean time per all-reduce, the slowest rank's.
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
}

/// nccl-tests' all-reduce bus-bandwidth factor 2(n-1)/n.
pub fn all_reduce_bus_factor(world_size: usize) -> f64 {
    if world_size <= 1 {
        return 0.0;
    }
    2.0 * (world_size as f64 - 1.0) / world_size as f64
}

/// Times f32 Sum all-reduces on every rank of `comm` (all ranks must call it with the same options).
pub fn run_comm_bench(comm: &dyn Communicator, opts: &CommBenchOptions) -> Result<Vec<CommBenchRow>, CommError> {
    let mut rows = Vec::new();
    for bytes in opts.sizes() {
        let elements = bytes / 4;
        let mut tensor = Tensor::ones([elements as i64], (Kind::Float, opts.device));
        for _ in 0..opts.warmup_iterations {
            comm.all_reduce(&mut tensor, ReduceOp::Sum)?;
        }
        let iterations = opts.iterations(bytes);
        comm.barrier()?;
        let start = Instant::now();
        for _ in 0..iterations {
            comm.all_reduce(&mut tensor, ReduceOp::Sum)?;
        }
        let mean_s = start.elapsed().as_secs_f64() / iterations as f64;
        // Report the slowest rank, as the collective is only done when every rank is.
        let time_s = crate::scalars::all_reduce_f64(comm, &[mean_s], ReduceOp::Max)?[0];
        let algbw_gbps = bytes as f64 / time_s / 1e9;
        rows.push(CommBenchRow {
            bytes,
            elements,
            iterations,
            time_us: time_s * 1e6,
            algbw_gbps,
            busbw_gbps: algbw_gbps * all_reduce_bus_factor(comm.world_size()),
        });
    }
    Ok(rows)
}

fn human_bytes(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A markdown table of the rows.
pub fn format_table(rows: &[CommBenchRow], world: usize, backend: &str) -> String {
    let mut out = format!("all_reduce f32 sum, backend {backend}, {world} ranks\n\n");
    out.push_str("| size | elements | iters | time (us) | algbw (GB/s) | busbw (GB/s) |\n");
    out.push_str("|---:|---:|---:|---:|---:|---:|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.3} | {:.3} |\n",
            human_bytes(row.bytes),
            row.elements,
            row.iterations,
            row.time_us,
            row.algbw_gbps,
            row.busbw_gbps
        ));
    }
    out
}

#[derive(Serialize)]
struct BenchReport<'a> {
    backend: &'a str,
    world_size: usize,
    collective: &'static str,
    rows: &'a [CommBenchRow],
}

/// The JSON written by [`bench_worker_main`] (same layout as bench/gloo_allreduce.py's).
pub fn rows_to_json(rows: &[CommBenchRow], world: usize, backend: &str) -> String {
    let report = BenchReport { backend, world_size: world, collective: "all_reduce_f32_sum", rows };
    serde_json::to_string_pretty(&report).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// Body of one benchmark worker process: reads the rank environment (RANK and WORLD_SIZE must be set;
/// MGRUN_COMM_TIMEOUT_S defaults to 120), joins the world, runs the benchmark; rank 0 prints the table
/// and writes the JSON to `json_out`.
pub fn bench_worker_main(max_bytes: usize, json_out: Option<&Path>) -> anyhow::Result<()> {
    let env = RankEnv::from_launcher_env()?;
    let (rank, world_size) = (env.rank, env.world_size);
    let timeout = env.comm_timeout.unwrap_or(Duration::from_secs(120));
    let store = StoreClient::connect_rank(&env, timeout).context("connecting to the rendezvous store")?;
    // CUDA ranks (MGRUN_DEVICE=cuda) measure NCCL on device memory (the TCP backend through pinned
    // host buffers when ranks share a GPU); CPU ranks the TCP backend.
    let device = env.assigned_device();
    let backend = crate::Backend::select(crate::BackendChoice::Auto, device, env.ranks_per_gpu)?;
    let comm = crate::connect(backend, &store, rank, world_size, device, timeout)
        .with_context(|| format!("rank {rank} joining the world of {world_size}"))?;
    let comm = comm.as_ref();
    let options = CommBenchOptions { max_bytes, device, ..CommBenchOptions::default() };
    let rows = run_comm_bench(comm, &options).with_context(|| format!("benchmark on rank {rank}"))?;
    if rank == 0 {
        print!("{}", format_table(&rows, world_size, comm.backend()));
        if let Some(path) = json_out {
            std::fs::write(path, rows_to_json(&rows, world_size, comm.backend()))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_iterations() {
        let options = CommBenchOptions { max_bytes: 1 << 20, ..CommBenchOptions::default() };
        assert_eq!(options.sizes(), vec![1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]);
        assert_eq!(options.iterations(1 << 10), 50);
        assert_eq!(options.iterations(256 << 20), 3);
        assert_eq!(all_reduce_bus_factor(4), 1.5);
    }

    #[test]
    fn single_rank_bench_and_table() {
        let options = CommBenchOptions { max_bytes: 4 << 10, ..CommBenchOptions::default() };
        let rows = run_comm_bench(&crate::SingleRank::default(), &options).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].elements, 1024);
        assert_eq!(rows[0].busbw_gbps, 0.0);
        let table = format_table(&rows, 1, "single");
        assert!(table.contains("| 4 KiB | 1024 | 50 |"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&rows_to_json(&rows, 1, "single")).unwrap();
        assert_eq!(json["rows"][1]["bytes"], 4096);
    }
}
