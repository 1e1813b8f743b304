use crate::{check_device, Communicator, ReduceOp, Result};
use tch::{Device, Tensor};

/// The world of one rank: every collective is the identity, but the device rule is checked as in
/// the other backends, so a one-rank run catches what would fail on several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleRank {
    device: Device,
}

impl SingleRank {
    pub fn new(device: Device) -> Self {
        Self { device }
    }
}

impl Default for SingleRank {
    /// The world of one CPU rank.
    fn default() -> Self {
        Self::new(Device::Cpu)
    }
}

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
    fn device(&self) -> Device {
        self.device
    }
    fn all_reduce(&self, tensor: &mut Tensor, _op: ReduceOp) -> Result<()> {
        check_device(self, "all_reduce", tensor)
    }
    fn broadcast(&self, tensor: &mut Tensor, _root: usize) -> Result<()> {
        check_device(self, "broadcast", tensor)
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        check_device(self, "all_gather", tensor)?;
        Ok(tensor.unsqueeze(0))
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn split(&self, _color: usize) -> Result<Box<dyn Communicator>> {
        Ok(Box::new(*self))
    }
}
