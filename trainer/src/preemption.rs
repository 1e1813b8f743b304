//! Preemption: a rank asked to stop early (Slurm's `--signal=USR1@90`, or USR2) finishes its step,
//! agrees with the other ranks that the job stops, writes a checkpoint and exits with
//! [`PREEMPTED_EXIT_CODE`] so that the launcher requeues the job.
//!
//! The signal handler only sets a flag: checkpointing inside a handler (which may interrupt a
//! collective, or the allocator) is what makes other frameworks hang. The ranks act on the flag at a
//! step boundary, and all of them together, since a signal may reach some ranks a step later than others.
//!
//! Once a rank has the notice, a SIGTERM (the scheduler's end of the grace period) no longer kills it
//! at once: it stops at the next step boundary too, so that a SIGTERM close behind the notice does not
//! cut the checkpoint short. The launcher's SIGKILL after `--grace-s` still bounds the wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use mgrun_collectives::{scalars, Communicator, ReduceOp};

/// Exit status of a rank (and of the launcher) that stopped for preemption after writing a checkpoint
/// (EX_TEMPFAIL: "try again later").
pub const PREEMPTED_EXIT_CODE: i32 = 75;

/// Signals that ask for a checkpoint and a requeue.
const PREEMPTION_SIGNALS: [i32; 2] = [libc::SIGUSR1, libc::SIGUSR2];

/// The flags set by SIGUSR1/SIGUSR2 (and SIGTERM after them) in this process.
pub struct PreemptionSignal {
    requested: Arc<AtomicBool>,
    /// SIGTERM's default action (termination) applies while this is set: until a notice arrives.
    terminate_at_once: Arc<AtomicBool>,
    terminated: Arc<AtomicBool>,
}

impl PreemptionSignal {
    /// Installs the handlers; from now on SIGUSR1 and SIGUSR2 no longer end the process.
    pub fn install() -> Result<PreemptionSignal> {
        let requested = Arc::new(AtomicBool::new(false));
        let terminate_at_once = Arc::new(AtomicBool::new(true));
        let terminated = Arc::new(AtomicBool::new(false));
        for signal in PREEMPTION_SIGNALS {
            let (requested, terminate_at_once) = (requested.clone(), terminate_at_once.clone());
            // SAFETY: the action only stores to atomics, which is async-signal-safe.
            unsafe {
                signal_hook::low_level::register(signal, move || {
                    requested.store(true, Ordering::SeqCst);
                    terminate_at_once.store(false, Ordering::SeqCst);
                })
            }
            .with_context(|| format!("installing the handler of signal {signal} (preemption)"))?;
        }
        signal_hook::flag::register(libc::SIGTERM, terminated.clone()).context("installing the SIGTERM handler")?;
        signal_hook::flag::register_conditional_default(libc::SIGTERM, terminate_at_once.clone())
            .context("installing SIGTERM's default action")?;
        Ok(PreemptionSignal { requested, terminate_at_once, terminated })
    }

    /// Whether this rank has received a preemption signal (or a SIGTERM after one).
    pub fn requested_here(&self) -> bool {
        self.requested.load(Ordering::SeqCst) || self.terminated_after_notice()
    }

    /// A SIGTERM arrived after the preemption notice and was held back.
    pub fn terminated_after_notice(&self) -> bool {
        !self.terminate_at_once.load(Ordering::SeqCst) && self.terminated.load(Ordering::SeqCst)
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
