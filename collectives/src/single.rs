use crate::{Communicator, ReduceOp, Result};
use tch::Tensor;

/// The world of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce(&self, _tensor: &mut Tensor, _op: ReduceOp) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.unsqueeze(0))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(SingleRank))
    }
}
