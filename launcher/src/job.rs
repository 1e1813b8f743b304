//! Launching a job's ranks on this launcher: placement, GPU checks, the agreement hash of multi-node
//! jobs, and the plan handed to [`launch::launch`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use mgrun_collectives::DeviceKind;

use crate::cli::LaunchArgs;
use crate::launch::{self, LaunchPlan, RankConfig};
use crate::run_dir::{self, RunDirPolicy};
use crate::{cuda, placement};

/// Seconds between SIGTERM and SIGKILL when ranks are stopped, unless `--grace-s` says otherwise.
const DEFAULT_GRACE_S: f64 = 3.0;

/// What the ranks of a job run, and what must agree across the launchers of a multi-node job.
pub struct WorkerCommand {
    pub args: Vec<OsString>,
    /// The job config the ranks read (training jobs).
    pub rank_config: Option<RankConfig>,
    /// Text whose hash every launcher compares at the rendezvous (the resolved config, say).
    pub agreement: String,
    /// Training jobs: the launcher of rank 0 claims the run directory (see [`crate::run_dir`]).
    pub run_dir: Option<RunDirPolicy>,
    /// Training jobs: what the config allows on the number of ranks, checked once they are placed and
    /// before any starts.
    pub check_world_size: Option<Box<dyn Fn(usize) -> anyhow::Result<()>>>,
}

/// Places this launcher's ranks and runs them to completion; returns the launcher's exit code.
pub fn launch_job(
    launch: &LaunchArgs,
    out_dir: PathBuf,
    worker: WorkerCommand,
    cuda_load_error: Option<&str>,
) -> anyhow::Result<i32> {
    let ranks_per_gpu = launch.ranks_per_gpu.unwrap_or(1);
    let slurm = placement::SlurmContext::from_env()?;
    let request = placement::PlacementRequest {
        gpus: launch.gpus,
        cpus: launch.cpus,
        ranks_per_gpu,
        nnodes: launch.nnodes,
        node_rank: launch.node_rank,
        master_addr: launch.master_addr.clone(),
        master_port: launch.master_port,
        rdzv_timeout_s: launch.rdzv_timeout_s,
        slurm_task: launch.slurm_task,
    };
    let place = placement::place(&request, slurm.as_ref())?;
    if place.device == DeviceKind::Cuda {
        let gpus_here = place.local.iter().map(|rank| rank.cuda_device + 1).max().unwrap_or(1);
        if launch.slurm_task {
            cuda::check_gpus(gpus_here, 1, cuda_load_error)?;
        } else {
            cuda::check_gpus(place.per_node, ranks_per_gpu, cuda_load_error)?;
        }
    }
    if let Some(check) = &worker.check_world_size {
        check(place.world_size)?;
    }
    if !place.source.is_empty() {
        println!("mgrun: {}", place.source);
    }
    // Held until the job ends: no other job writes into this run directory meanwhile.
    let _run_dir = match worker.run_dir {
        Some(policy) if place.local.iter().any(|rank| rank.rank == 0) => Some(run_dir::claim(&out_dir, policy)?),
        _ => None,
    };
    let grace_s = launch.grace_s.unwrap_or(DEFAULT_GRACE_S);
    anyhow::ensure!(
        grace_s.is_finite() && grace_s >= 0.0,
        "--grace-s must be a non-negative number of seconds, got {grace_s}"
    );
    let job_hash = {
        use sha2::Digest;
        let described = format!(
            "{}\n{:?} {} per node, {} ranks, ranks per GPU {ranks_per_gpu}\nout {}\n",
            worker.agreement,
            place.device,
            place.per_node,
            place.world_size,
            out_dir.display()
        );
        let digest = sha2::Sha256::digest(described.as_bytes());
        digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect::<String>()
    };
    let plan = LaunchPlan {
        world_size: place.world_size,
        device: place.device,
        ranks_per_gpu,
        local: place.local,
        local_world_size: place.local_world_size,
        group_rank: place.group_rank,
        group_world_size: place.group_world_size,
        out_dir,
        worker_args: worker.args,
        rank_config: worker.rank_config,
        rendezvous: place.rendezvous,
        job_hash,
        max_restarts: launch.max_restarts.unwrap_or(0),
        requeue_target: place.requeue_target,
        grace: Duration::from_secs_f64(grace_s),
    };
    launch::launch(&plan)
}

/// `runs/<stem>-slurm<job id>` inside Slurm (the same on every node, and again after a requeue), else
/// `runs/<stem>-<time>` on one node; several nodes need a shared `--out`.
pub fn default_out_dir(launch: &LaunchArgs, stem: &str) -> anyhow::Result<PathBuf> {
    if let Ok(job_id) = std::env::var("SLURM_JOB_ID") {
        return Ok(PathBuf::from("runs").join(format!("{stem}-slurm{job_id}")));
    }
    anyhow::ensure!(
        launch.nnodes.unwrap_or(1) == 1,
        "--nnodes > 1: give --out DIR, the same directory (on a shared file system) on every node"
    );
    Ok(launch::default_out_dir(stem))
}

/// Workers share the launcher's working directory, but an absolute path survives a worker that changes it.
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}
