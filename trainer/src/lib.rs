//! The mgrun trainer: typed job config, domain sharding, the training loop and evaluation.

pub mod bench_step;
pub mod config;
pub mod eval;
pub mod preemption;
pub mod progress;
pub mod records;
pub mod sharding;
mod worker;

pub use config::JobConfig;
pub use preemption::{WorkerOutcome, PREEMPTED_EXIT_CODE};
pub use worker::run_worker;

use std::path::PathBuf;

/// What a worker process (one rank) is started with; the rank itself comes from the environment
/// (torchrun's contract: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub config: PathBuf,
    /// `--set a.b=value` overrides, in order.
    pub overrides: Vec<String>,
    pub out_dir: PathBuf,
}
