//! Communication overlapped with backward (`comm.overlap`), as DDP does it: the flat gradient is cut
//! into the same buckets as [`mgrun_collectives::all_reduce_flat`], and a bucket is all-reduced on a
//! communication thread as soon as backward has accumulated the gradient of every parameter in it,
//! while backward goes on with earlier layers.
//!
//! - **The same bits as without overlap.** Buckets are the same ranges and each is reduced by the
//!   same ring algorithm over the same ranks (a communicator split off the world for this thread),
//!   so every element is summed in the same order; only the time of each reduction moves.
//! - **The same order on every rank.** The thread reduces buckets from the last to the first (the
//!   order backward produces them), waiting for each in turn, so no rank's collectives depend on
//!   the order its hooks happened to fire in.
//! - **Where it applies.** The batch gradient of one backward on the fast path: ERM and the methods
//!   built on [`crate::gradients::batch_gradient`] with the plain loss, global SAM's two passes
//!   among them (its norm waits for the whole reduced first gradient, which the overlap delivers).
//!   It does not apply where each domain's whole gradient is needed before anything crosses ranks:
//!   deterministic mode (every unit's gradient is gathered), per-domain gradients (DSP-Reg's
//!   moments, Fishr, per-domain SAM: a backward per domain, each reduced within its group), nor
//!   to losses other than the plain cross-entropy (Mixup's) or per-domain offsets.
//!   CUDA ranks do not overlap yet: the hook fires when the gradient kernel is queued, not done,
//!   and the NCCL stream would have to wait on an event of tch's stream.

use anyhow::{bail, Context, Result};
use mgrun_collectives::{Communicator, ReduceOp};
use mgrun_models::ParamStore;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use tch::Tensor;

/// The bucket reduction of one rank, running beside its backward passes.
pub struct GradientOverlap {
    readiness: Arc<Readiness>,
    jobs: Option<Sender<Tensor>>,
    done: Receiver<Result<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Which buckets backward has finished, shared with the hooks and the communication thread.
struct Readiness {
    state: Mutex<ReadinessState>,
    changed: Condvar,
    /// For every parameter, the buckets its gradient falls in.
    buckets_of_param: Vec<Vec<usize>>,
    /// For every bucket, how many parameters fall in it.
    params_per_bucket: Vec<usize>,
}

struct ReadinessState {
    /// A backward with overlap is running (hooks of other backward passes are ignored).
    armed: bool,
    waiting_for: Vec<usize>,
    ready: Vec<bool>,
}

impl Readiness {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReadinessState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn arm(&self) {
        let mut state = self.lock();
        state.armed = true;
        state.waiting_for.clone_from(&self.params_per_bucket);
        state.ready.iter_mut().for_each(|r| *r = false);
    }

    /// Backward has ended: every gradient is final, including those of parameters it never reached.
    fn finish(&self) {
        let mut state = self.lock();
        state.armed = false;
        state.ready.iter_mut().for_each(|r| *r = true);
        self.changed.notify_all();
    }

    fn param_ready(&self, param: usize) {
        let mut state = self.lock();
        if !state.armed {
            return;
        }
        let mut any = false;
        for &bucket in self.buckets_of_param.get(param).map_or(&[][..], Vec::as_slice) {
            state.waiting_for[bucket] = state.waiting_for[bucket].saturating_sub(1);
            if state.waiting_for[bucket] == 0 && !state.ready[bucket] {
                state.ready[bucket] = true;
                any = true;
            }
        }
        if any {
            self.changed.notify_all();
        }
    }

    fn wait_for(&self, bucket: usize) {
        let mut state = self.lock();
        while !state.ready[bucket] {
            state = self.changed.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

extern "C" fn grad_ready(context: *mut std::ffi::c_void, index: i64) {
    // SAFETY: `context` is the `Readiness` leaked in `GradientOverlap::new`, never freed.
    let readiness = unsafe { &*(context as *const Readiness) };
    // Unwinding into libtorch's C++ would abort; nothing here panics but the guard costs nothing.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| readiness.param_ready(index as usize)));
}

/// The element ranges of the buckets of a flat buffer of `numel` elements of `elem` bytes, as
/// [`mgrun_collectives::all_reduce_flat`] cuts it.
pub fn bucket_ranges(numel: usize, elem: usize, bucket_bytes: usize) -> Vec<(usize, usize)> {
    let per_bucket = (bucket_bytes / elem.max(1)).max(1);
    (0..numel).step_by(per_bucket).map(|start| (start, per_bucket.min(numel - start))).collect()
}

impl GradientOverlap {
    /// Hooks every parameter of `store` and starts the communication thread on a communicator
    /// split off `world` (every rank of `world` must call this, as for any split).
    pub fn new(world: &dyn Communicator, store: &ParamStore, bucket_bytes: usize) -> Result<GradientOverlap> {
        if store.device().is_cuda() {
            bail!("comm.overlap: CUDA ranks do not overlap communication yet (see methods/src/overlap.rs)");
        }
        let comm = world.split(0).context("comm.overlap: the communicator of the overlap thread")?;
        let buckets = bucket_ranges(store.numel(), 4, bucket_bytes);
        let mut params_per_bucket = vec![0; buckets.len()];
        let buckets_of_param: Vec<Vec<usize>> = store
            .params()
            .iter()
            .map(|p| {
                let hit: Vec<usize> = buckets
                    .iter()
                    .enumerate()
                    .filter(|(_, (start, len))| p.numel > 0 && p.offset < start + len && *start < p.offset + p.numel)
                    .map(|(b, _)| b)
                    .collect();
                for &b in &hit {
                    params_per_bucket[b] += 1;
                }
                hit
            })
            .collect();
        let readiness = Arc::new(Readiness {
            state: Mutex::new(ReadinessState {
                armed: false,
                waiting_for: params_per_bucket.clone(),
                ready: vec![false; buckets.len()],
            }),
            changed: Condvar::new(),
            buckets_of_param,
            params_per_bucket,
        });
        // The hooks live as long as the parameters, which may outlive this value: they keep their
        // own reference, leaked (one per run).
        let context = Arc::into_raw(readiness.clone()) as *mut std::ffi::c_void;
        for (index, param) in store.params().iter().enumerate() {
            if !param.tensor.requires_grad() {
                continue;
            }
            // SAFETY: `context` is never freed; `grad_ready` does not unwind.
            unsafe { mgrun_torch_shim::set_grad_ready_hook(&param.tensor, grad_ready, context, index as i64) }
                .with_context(|| format!("comm.overlap: hooking parameter {}", param.name))?;
        }
        let (jobs, job_receiver) = channel::<Tensor>();
        let (done_sender, done) = channel();
        let thread_readiness = readiness.clone();
        let thread = std::thread::Builder::new()
            .name("mgrun-overlap".into())
            .spawn(move || reduce_buckets(comm, &thread_readiness, &buckets, &job_receiver, &done_sender))
            .context("comm.overlap: starting the communication thread")?;
        Ok(GradientOverlap { readiness, jobs: Some(jobs), done, thread: Some(thread) })
    }

    /// How many buckets the flat gradient is reduced in.
    pub fn buckets(&self) -> usize {
        self.readiness.params_per_bucket.len()
    }

    /// Zeroes the gradient, runs `loss`'s backward while its buckets are summed over the ranks, and
    /// returns the flat gradient, summed (an alias of the store's gradient buffer).
    pub fn backward(&self, store: &mut ParamStore, loss: &Tensor) -> Result<Tensor> {
        store.zero_grad();
        let flat_grad = store.flat_grad_alias();
        self.readiness.arm();
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(flat_grad.shallow_clone()));
        let backward = loss.f_backward().context("backward pass");
        // Also on failure: the thread must not wait for buckets that will never be reported.
        self.readiness.finish();
        if !matches!(sent, Some(Ok(()))) {
            bail!("comm.overlap: the communication thread has stopped");
        }
        let reduced = {
            let _waiting = mgrun_telemetry::phase(mgrun_telemetry::Phase::Comm);
            self.done.recv().unwrap_or_else(|_| Err(anyhow::anyhow!("comm.overlap: the communication thread stopped")))
        };
        backward?;
        reduced.context("all-reduce of the batch gradient's buckets (overlapped with backward)")?;
        Ok(flat_grad)
    }
}

impl Drop for GradientOverlap {
    fn drop(&mut self) {
        // Closing the job channel ends the thread.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The communication thread: for every flat gradient sent, the buckets last to first, each once
/// backward has finished it.
fn reduce_buckets(
    comm: Box<dyn Communicator>,
    readiness: &Readiness,
    buckets: &[(usize, usize)],
    jobs: &Receiver<Tensor>,
    done: &Sender<Result<()>>,
) {
    mgrun_telemetry::mark_background_thread();
    while let Ok(flat_grad) = jobs.recv() {
        let mut result = Ok(());
        for (bucket, &(start, len)) in buckets.iter().enumerate().rev() {
            readiness.wait_for(bucket);
            let mut view = flat_grad.narrow(0, start as i64, len as i64);
            if let Err(error) = comm.all_reduce(&mut view, ReduceOp::Sum) {
                result = Err(anyhow::Error::new(error).context(format!("bucket {bucket} of {}", buckets.len())));
                break;
            }
        }
        let failed = result.is_err();
        if done.send(result).is_err() || failed {
            // A failed communicator cannot be used again; the rank fails with the error sent.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_the_flat_all_reduce() {
        assert_eq!(bucket_ranges(10, 4, 16), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(bucket_ranges(3, 4, 1), vec![(0, 1), (1, 1), (2, 1)]);
        assert!(bucket_ranges(0, 4, 16).is_empty());
    }
}
