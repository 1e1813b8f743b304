//! A rank's identity, from torchrun's environment contract plus the device variables of the `mgrun`
//! launcher ([`RankDevice`]).

use anyhow::{bail, Result};
use mgrun_collectives::rank_device::env_usize;
use mgrun_collectives::RankDevice;
use tch::Device;

#[derive(Debug, Clone, PartialEq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    /// `cuda` or `cpu` (MGRUN_DEVICE, set by the launcher).
    pub device_kind: String,
    /// Ranks sharing each GPU (`--ranks-per-gpu`; 1 on CPU ranks).
    pub ranks_per_gpu: usize,
}

fn var_usize(name: &str, default: usize) -> Result<usize> {
    Ok(env_usize(name)?.unwrap_or(default))
}

impl RankEnv {
    /// Reads RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the device variables; a process
    /// started without them is the single rank of a one-process job.
    pub fn from_env() -> Result<RankEnv> {
        let rank = var_usize("RANK", 0)?;
        let world_size = var_usize("WORLD_SIZE", 1)?;
        let local_rank = var_usize("LOCAL_RANK", rank)?;
        let local_world_size = var_usize("LOCAL_WORLD_SIZE", world_size)?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} is not below WORLD_SIZE={world_size}");
        }
        let device_kind = std::env::var("MGRUN_DEVICE").unwrap_or_else(|_| "cpu".to_string());
        let ranks_per_gpu = RankDevice::from_env()?.ranks_per_gpu;
        Ok(RankEnv { rank, local_rank, world_size, local_world_size, device_kind, ranks_per_gpu })
    }

    pub fn device(&self) -> Result<Device> {
        let device = RankDevice::from_env()?.device;
        if device.is_cuda() && !tch::Cuda::is_available() {
            bail!("rank {}: MGRUN_DEVICE=cuda but CUDA is not available to this process", self.rank);
        }
        Ok(device)
    }
}
