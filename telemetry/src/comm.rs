//! A [`Communicator`] that times every collective and counts its bytes ([`crate::collective`]).
//!
//! On CUDA ranks NCCL calls return once enqueued, so the time is the host's (the enqueue, or a
//! wait for the stream where the backend waits); the device time shows up where the host next
//! waits for the device (the loss read at the end of the update).

use crate::CollectiveKind;
use mgrun_collectives::{Communicator, ReduceOp, Result};
use tch::{Device, Tensor};

pub struct InstrumentedCommunicator {
    inner: Box<dyn Communicator>,
}

impl InstrumentedCommunicator {
    pub fn wrap(inner: Box<dyn Communicator>) -> Box<dyn Communicator> {
        Box::new(InstrumentedCommunicator { inner })
    }
}

fn bytes_of(tensor: &Tensor) -> usize {
    tensor.numel() * tensor.kind().elt_size_in_bytes()
}

impl Communicator for InstrumentedCommunicator {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn device(&self) -> Device {
        self.inner.device()
    }
    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        let _span = crate::collective(CollectiveKind::AllReduce, bytes_of(tensor));
        self.inner.all_reduce(tensor, op)
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        let _span = crate::collective(CollectiveKind::Broadcast, bytes_of(tensor));
        self.inner.broadcast(tensor, root)
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let _span = crate::collective(CollectiveKind::AllGather, bytes_of(tensor));
        self.inner.all_gather(tensor)
    }
    fn barrier(&self) -> Result<()> {
        let _span = crate::collective(CollectiveKind::Barrier, 0);
        self.inner.barrier()
    }
    fn split(&self, color: usize) -> Result<Box<dyn Communicator>> {
        let _span = crate::collective(CollectiveKind::Split, 0);
        Ok(InstrumentedCommunicator::wrap(self.inner.split(color)?))
    }
}
