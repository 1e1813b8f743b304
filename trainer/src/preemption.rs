//! Preemption: a rank asked to stop early (Slurm's `--signal=USR1@90`, or USR2) finishes its step,
//! agrees with the other ranks that the job stops, writes a checkpoint and exits with
//! [`PREEMPTED_EXIT_CODE`] so that the launcher requeues the job.
//!
//! The signal handler only sets a flag: checkpointing inside a handler (which may interrupt a
//! collective, or the allocator) is what makes other frameworks hang. The ranks act on the flag at a
//! step boundary, and all of them together, since a signal may reach some ranks a step later than others.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use mgrun_collectives::{scalars, Communicator, ReduceOp};

/// Exit status of a rank (and of the launcher) that stopped for preemption after writing a checkpoint
/// (EX_TEMPFAIL: "try again later").
pub const PREEMPTED_EXIT_CODE: i32 = 75;

/// Signals that ask for a checkpoint and a requeue.
const PREEMPTION_SIGNALS: [i32; 2] = [libc::SIGUSR1, libc::SIGUSR2];

/// The flag set by SIGUSR1/SIGUSR2 in this process.
pub struct PreemptionSignal {
    requested: Arc<AtomicBool>,
}

impl PreemptionSignal {
    /// Installs the handlers; from now on SIGUSR1 and SIGUSR2 no longer end the process.
    pub fn install() -> Result<PreemptionSignal> {
        let requested = Arc::new(AtomicBool::new(false));
        for signal in PREEMPTION_SIGNALS {
            signal_hook::flag::register(signal, requested.clone())
                .with_context(|| format!("installing the handler of signal {signal} (preemption)"))?;
        }
        Ok(PreemptionSignal { requested })
    }

    /// Whether this rank has received a preemption signal.
    pub fn requested_here(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    /// Whether any rank has received one: a collective, so every rank must call it at the same step.
    pub fn requested_anywhere(&self, world: &dyn Communicator) -> Result<bool> {
        if world.world_size() == 1 {
            return Ok(self.requested_here());
        }
        let flag = if self.requested_here() { 1.0 } else { 0.0 };
        let sum = scalars::all_reduce_f64(world, &[flag], ReduceOp::Sum)
            .context("agreeing on preemption at a step boundary")?;
        Ok(sum[0] > 0.0)
    }
}

/// How a worker's run ended (an error is the third way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// Every step ran.
    Finished,
    /// Stopped for preemption after committing a checkpoint at `step`.
    Preempted { step: u64 },
}

impl WorkerOutcome {
    /// The process exit status for this outcome.
    pub fn exit_code(self) -> i32 {
        match self {
            WorkerOutcome::Finished => 0,
            WorkerOutcome::Preempted { .. } => PREEMPTED_EXIT_CODE,
        }
    }
}
