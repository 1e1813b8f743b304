//! The mgrun trainer: typed job config, domain sharding, the training loop and evaluation.

pub mod bench_step;
pub mod checkpointing;
pub mod config;
pub mod eval;
pub mod preemption;
pub mod progress;
pub mod records;
pub mod sharding;
pub mod swad;
mod worker;

pub use config::JobConfig;

/// The trained model in the run directory.
pub const MODEL_FILE: &str = "model.safetensors";
/// The per-rank Chrome traces (`rank<N>.json`) of `[trace]`, under the run directory; the launcher
/// merges them into [`TRACE_FILE`].
pub const TRACE_DIR: &str = "trace";
pub const TRACE_FILE: &str = "trace.json";
pub use preemption::{WorkerOutcome, PREEMPTED_EXIT_CODE};
pub use worker::run_worker;

use std::path::PathBuf;

/// What a worker process (one rank) is started with; the rank itself comes from the environment
/// ([`mgrun_collectives::RankEnv`]: torchrun's contract plus mgrun's variables).
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    /// The job config as the launcher resolved it (`<out>/config.resolved.toml`: `--set` and `--resume`
    /// applied, paths absolute); loaded as it is.
    pub config: PathBuf,
    pub out_dir: PathBuf,
}
