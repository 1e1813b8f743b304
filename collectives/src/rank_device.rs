//! The device of a rank, from the environment the `mgrun` launcher sets: `MGRUN_DEVICE` (`cpu` or
//! `cuda`), `MGRUN_CUDA_DEVICE` (the GPU ordinal; default `LOCAL_RANK`, torchrun's one rank per GPU)
//! and `MGRUN_RANKS_PER_GPU` (how many ranks share each GPU, `--ranks-per-gpu`; default 1).

use anyhow::{anyhow, bail, Context, Result};
use tch::Device;

/// Where a rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankDevice {
    pub device: Device,
    /// Ranks sharing each GPU (1 on CPU ranks).
    pub ranks_per_gpu: usize,
}

impl RankDevice {
    pub fn from_env() -> Result<RankDevice> {
        let kind = std::env::var("MGRUN_DEVICE").unwrap_or_else(|_| "cpu".to_string());
        match kind.as_str() {
            "cpu" => Ok(RankDevice { device: Device::Cpu, ranks_per_gpu: 1 }),
            "cuda" => {
                let ordinal = match env_usize("MGRUN_CUDA_DEVICE")? {
                    Some(ordinal) => ordinal,
                    None => env_usize("LOCAL_RANK")?.unwrap_or(0),
                };
                let ranks_per_gpu = env_usize("MGRUN_RANKS_PER_GPU")?.unwrap_or(1);
                if ranks_per_gpu == 0 {
                    bail!("environment variable MGRUN_RANKS_PER_GPU=0: at least one rank per GPU");
                }
                Ok(RankDevice { device: Device::Cuda(ordinal), ranks_per_gpu })
            }
            other => bail!("environment variable MGRUN_DEVICE={other:?}: expected cpu or cuda"),
        }
    }
}

/// The non-negative integer in environment variable `name`, `None` when it is not set; an error
/// naming the variable when it holds anything else. Every reader of the rank environment uses it.
pub fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Ok(v) => {
            v.trim().parse().map(Some).with_context(|| format!("environment variable {name}={v:?} is not an integer"))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(anyhow!("environment variable {name}: {e}")),
    }
}
