//! The rank environment: the variables a launcher sets for every rank it starts (torchrun's contract
//! plus mgrun's own), read and written by one type, [`RankEnv`], so that what launchers write and what
//! ranks read cannot drift apart.
//!
//! Writers: the `mgrun` launcher and `mgrun-comm-check launch` ([`RankEnv::vars`]). Readers: training
//! ranks, benchmark, selftest and check ranks ([`RankEnv::from_env`], [`RankEnv::from_launcher_env`]).
//! A process started without the variables is the single rank of a one-process job on the CPU.

use anyhow::{anyhow, bail, Context, Result};
use std::time::Duration;
use tch::Device;

/// The names of the variables, the whole contract.
pub mod var {
    /// The global rank.
    pub const RANK: &str = "RANK";
    /// The rank's index among the ranks of its node.
    pub const LOCAL_RANK: &str = "LOCAL_RANK";
    pub const WORLD_SIZE: &str = "WORLD_SIZE";
    /// Ranks on this node.
    pub const LOCAL_WORLD_SIZE: &str = "LOCAL_WORLD_SIZE";
    /// This node among the job's nodes, and the number of nodes.
    pub const GROUP_RANK: &str = "GROUP_RANK";
    pub const GROUP_WORLD_SIZE: &str = "GROUP_WORLD_SIZE";
    /// Restarts of the job so far, under torchrun's name and mgrun's (written both; read from mgrun's).
    pub const TORCHELASTIC_RESTART_COUNT: &str = "TORCHELASTIC_RESTART_COUNT";
    pub const RESTART_COUNT: &str = "MGRUN_RESTART_COUNT";
    /// Where the rendezvous store listens.
    pub const MASTER_ADDR: &str = "MASTER_ADDR";
    pub const MASTER_PORT: &str = "MASTER_PORT";
    /// The secret a store client authenticates with.
    pub const STORE_TOKEN: &str = "MGRUN_STORE_TOKEN";
    /// Prefix of every store key of this attempt: each restart gets its own key space in the one store.
    pub const STORE_NAMESPACE: &str = "MGRUN_STORE_NAMESPACE";
    /// The same id on every rank of one job (logs, diagnostics).
    pub const JOB_ID: &str = "MGRUN_JOB_ID";
    /// `cpu` or `cuda`.
    pub const DEVICE: &str = "MGRUN_DEVICE";
    /// The GPU ordinal of a CUDA rank.
    pub const CUDA_DEVICE: &str = "MGRUN_CUDA_DEVICE";
    /// CUDA ranks sharing each GPU (`--ranks-per-gpu`).
    pub const RANKS_PER_GPU: &str = "MGRUN_RANKS_PER_GPU";
    /// Communicator timeout of the benchmark and check ranks, in seconds (training ranks use
    /// `comm.timeout_s` of the job config).
    pub const COMM_TIMEOUT_S: &str = "MGRUN_COMM_TIMEOUT_S";
}

/// Where a rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The value of [`var::DEVICE`].
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rank's identity and the job it belongs to, as its launcher passes them in the environment.
#[derive(Clone, PartialEq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world_size: usize,
    pub local_world_size: usize,
    pub group_rank: usize,
    pub group_world_size: usize,
    /// 0 for the first start, k for the k-th restart.
    pub restart_count: usize,
    /// The rendezvous store; `None` where not set (a one-process job needs no store).
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub store_token: Option<String>,
    /// Empty where not set.
    pub store_namespace: String,
    pub job_id: Option<String>,
    pub device_kind: DeviceKind,
    /// The GPU of a CUDA rank (default: `local_rank`, torchrun's one rank per GPU); unused on CPU ranks.
    pub cuda_device: usize,
    /// Ranks sharing each GPU (1 on CPU ranks).
    pub ranks_per_gpu: usize,
    /// For benchmark and check ranks; each picks its own default where not set.
    pub comm_timeout: Option<Duration>,
}

impl std::fmt::Debug for RankEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything but the token, which is a secret.
        f.debug_struct("RankEnv")
            .field("rank", &self.rank)
            .field("local_rank", &self.local_rank)
            .field("world_size", &self.world_size)
            .field("local_world_size", &self.local_world_size)
            .field("group_rank", &self.group_rank)
            .field("group_world_size", &self.group_world_size)
            .field("restart_count", &self.restart_count)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("store_token", &self.store_token.as_ref().map(|_| "<set>"))
            .field("store_namespace", &self.store_namespace)
            .field("job_id", &self.job_id)
            .field("device_kind", &self.device_kind)
            .field("cuda_device", &self.cuda_device)
            .field("ranks_per_gpu", &self.ranks_per_gpu)
            .field("comm_timeout", &self.comm_timeout)
            .finish()
    }
}

impl RankEnv {
    /// The single rank of a one-process job on the CPU, without a store.
    pub fn single_rank() -> RankEnv {
        RankEnv {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            group_rank: 0,
            group_world_size: 1,
            restart_count: 0,
            master_addr: None,
            master_port: None,
            store_token: None,
            store_namespace: String::new(),
            job_id: None,
            device_kind: DeviceKind::Cpu,
            cuda_device: 0,
            ranks_per_gpu: 1,
            comm_timeout: None,
        }
    }

    /// Reads this process's rank environment; variables that are not set take the values of
    /// [`RankEnv::single_rank`] (`LOCAL_RANK` defaults to `RANK`, `LOCAL_WORLD_SIZE` to `WORLD_SIZE`).
    /// A variable set to something unusable is an error naming it.
    pub fn from_env() -> Result<RankEnv> {
        RankEnv::from_lookup(process_var, false)
    }

    /// Like [`RankEnv::from_env`] for processes that only run as a launched rank (benchmark, selftest
    /// and check ranks): `RANK` and `WORLD_SIZE` must be set.
    pub fn from_launcher_env() -> Result<RankEnv> {
        RankEnv::from_lookup(process_var, true)
    }

    fn from_lookup(lookup: impl Fn(&str) -> Result<Option<String>>, launched: bool) -> Result<RankEnv> {
        let text = |name: &str| lookup(name);
        let number =
            |name: &str| -> Result<Option<usize>> {
                match lookup(name)? {
                    Some(value) => value.trim().parse().map(Some).with_context(|| {
                        format!("environment variable {name}={value:?} is not a non-negative integer")
                    }),
                    None => Ok(None),
                }
            };
        let required = |name: &str| -> Result<Option<usize>> {
            let value = number(name)?;
            if launched && value.is_none() {
                bail!("environment variable {name} is not set: this process runs as a rank started by a launcher");
            }
            Ok(value)
        };
        let rank = required(var::RANK)?.unwrap_or(0);
        let world_size = required(var::WORLD_SIZE)?.unwrap_or(1);
        if world_size == 0 || rank >= world_size {
            bail!("{}={rank} is not below {}={world_size}", var::RANK, var::WORLD_SIZE);
        }
        let local_rank = number(var::LOCAL_RANK)?.unwrap_or(rank);
        let local_world_size = number(var::LOCAL_WORLD_SIZE)?.unwrap_or(world_size);
        let master_port = match text(var::MASTER_PORT)? {
            Some(port) => Some(
                port.trim()
                    .parse::<u16>()
                    .with_context(|| format!("environment variable {}={port:?} is not a port", var::MASTER_PORT))?,
            ),
            None => None,
        };
        let device_kind = match text(var::DEVICE)?.as_deref() {
            None | Some("cpu") => DeviceKind::Cpu,
            Some("cuda") => DeviceKind::Cuda,
            Some(other) => bail!("environment variable {}={other:?}: expected cpu or cuda", var::DEVICE),
        };
        // The GPU variables mean nothing to a CPU rank and are not read there.
        let (cuda_device, ranks_per_gpu) = match device_kind {
            DeviceKind::Cpu => (local_rank, 1),
            DeviceKind::Cuda => {
                let ranks_per_gpu = number(var::RANKS_PER_GPU)?.unwrap_or(1);
                if ranks_per_gpu == 0 {
                    bail!("environment variable {}=0: at least one rank per GPU", var::RANKS_PER_GPU);
                }
                (number(var::CUDA_DEVICE)?.unwrap_or(local_rank), ranks_per_gpu)
            }
        };
        let comm_timeout = match text(var::COMM_TIMEOUT_S)? {
            Some(seconds) => Some(
                seconds
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
                    .with_context(|| {
                        format!("environment variable {}={seconds:?} is not a number of seconds", var::COMM_TIMEOUT_S)
                    })?,
            ),
            None => None,
        };
        Ok(RankEnv {
            rank,
            local_rank,
            world_size,
            local_world_size,
            group_rank: number(var::GROUP_RANK)?.unwrap_or(0),
            group_world_size: number(var::GROUP_WORLD_SIZE)?.unwrap_or(1),
            restart_count: number(var::RESTART_COUNT)?.unwrap_or(0),
            master_addr: text(var::MASTER_ADDR)?,
            master_port,
            store_token: text(var::STORE_TOKEN)?,
            store_namespace: text(var::STORE_NAMESPACE)?.unwrap_or_default(),
            job_id: text(var::JOB_ID)?,
            device_kind,
            cuda_device,
            ranks_per_gpu,
            comm_timeout,
        })
    }

    /// The variables that give a started process this environment, for `Command::envs`. Optional
    /// values that are `None` are left out, and the GPU variables on CPU ranks.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (var::RANK, self.rank.to_string()),
            (var::LOCAL_RANK, self.local_rank.to_string()),
            (var::WORLD_SIZE, self.world_size.to_string()),
            (var::LOCAL_WORLD_SIZE, self.local_world_size.to_string()),
            (var::GROUP_RANK, self.group_rank.to_string()),
            (var::GROUP_WORLD_SIZE, self.group_world_size.to_string()),
            (var::TORCHELASTIC_RESTART_COUNT, self.restart_count.to_string()),
            (var::RESTART_COUNT, self.restart_count.to_string()),
        ];
        let optional = [
            (var::MASTER_ADDR, self.master_addr.clone()),
            (var::MASTER_PORT, self.master_port.map(|port| port.to_string())),
            (var::STORE_TOKEN, self.store_token.clone()),
            (var::STORE_NAMESPACE, Some(self.store_namespace.clone())),
            (var::JOB_ID, self.job_id.clone()),
            (var::DEVICE, Some(self.device_kind.as_str().to_string())),
            (var::COMM_TIMEOUT_S, self.comm_timeout.map(|timeout| timeout.as_secs_f64().to_string())),
        ];
        vars.extend(optional.into_iter().filter_map(|(name, value)| Some((name, value?))));
        if self.device_kind == DeviceKind::Cuda {
            vars.push((var::CUDA_DEVICE, self.cuda_device.to_string()));
            vars.push((var::RANKS_PER_GPU, self.ranks_per_gpu.to_string()));
        }
        vars
    }

    /// The device the launcher assigned to this rank, without checking that this process can use it.
    pub fn assigned_device(&self) -> Device {
        match self.device_kind {
            DeviceKind::Cpu => Device::Cpu,
            DeviceKind::Cuda => Device::Cuda(self.cuda_device),
        }
    }

    /// The device of this rank; an error when it is a GPU but CUDA is not available to this process.
    pub fn device(&self) -> Result<Device> {
        let device = self.assigned_device();
        if device.is_cuda() && !tch::Cuda::is_available() {
            bail!("rank {}: {}=cuda but CUDA is not available to this process", self.rank, var::DEVICE);
        }
        Ok(device)
    }
}

/// The value of the process's environment variable `name`; `None` when it is not set.
fn process_var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(error) => Err(anyhow!("environment variable {name}: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Parses `vars` as if they were the whole environment.
    fn parse(vars: &[(&str, &str)], launched: bool) -> Result<RankEnv> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RankEnv::from_lookup(|name| Ok(vars.get(name).cloned()), launched)
    }

    fn round_trip(env: &RankEnv) -> RankEnv {
        let vars: HashMap<String, String> = env.vars().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        RankEnv::from_lookup(|name| Ok(vars.get(name).cloned()), true).unwrap()
    }

    #[test]
    fn without_variables_a_process_is_the_single_rank() {
        assert_eq!(parse(&[], false).unwrap(), RankEnv::single_rank());
        let error = parse(&[], true).unwrap_err().to_string();
        assert!(error.contains("RANK is not set"), "{error}");
    }

    #[test]
    fn local_values_default_to_global_ones() {
        let env = parse(&[("RANK", "3"), ("WORLD_SIZE", "4")], true).unwrap();
        assert_eq!((env.rank, env.local_rank, env.world_size, env.local_world_size), (3, 3, 4, 4));
        assert_eq!(env.assigned_device(), Device::Cpu);
    }

    #[test]
    fn what_is_written_is_read_back() {
        let cpu = RankEnv {
            rank: 5,
            local_rank: 1,
            world_size: 8,
            local_world_size: 4,
            group_rank: 1,
            group_world_size: 2,
            restart_count: 2,
            master_addr: Some("node-a".into()),
            master_port: Some(29500),
            store_token: Some("secret".into()),
            store_namespace: "attempt2/".into(),
            job_id: Some("abc123".into()),
            device_kind: DeviceKind::Cpu,
            cuda_device: 1,
            ranks_per_gpu: 1,
            comm_timeout: Some(Duration::from_millis(2500)),
        };
        assert_eq!(round_trip(&cpu), cpu);
        let cuda = RankEnv { device_kind: DeviceKind::Cuda, cuda_device: 0, ranks_per_gpu: 2, ..cpu.clone() };
        assert_eq!(round_trip(&cuda), cuda);
        assert_eq!(cuda.assigned_device(), Device::Cuda(0));
        assert!(!format!("{cuda:?}").contains("secret"));
        let single = RankEnv::single_rank();
        assert_eq!(round_trip(&single), single);
    }

    #[test]
    fn gpu_ordinal_defaults_to_the_local_rank() {
        let env =
            parse(&[("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4"), ("MGRUN_DEVICE", "cuda")], true).unwrap();
        assert_eq!((env.assigned_device(), env.ranks_per_gpu), (Device::Cuda(1), 1));
        // Ignored on CPU ranks, as garbage or not.
        let env = parse(&[("MGRUN_CUDA_DEVICE", "x"), ("MGRUN_RANKS_PER_GPU", "0")], false).unwrap();
        assert_eq!(env.ranks_per_gpu, 1);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: [(&[(&str, &str)], &str); 7] = [
            (&[("RANK", "x")], "RANK=\"x\""),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK=2 is not below WORLD_SIZE=2"),
            (&[("MASTER_PORT", "70000")], "MASTER_PORT=\"70000\""),
            (&[("MGRUN_DEVICE", "tpu")], "MGRUN_DEVICE=\"tpu\": expected cpu or cuda"),
            (&[("MGRUN_DEVICE", "cuda"), ("MGRUN_RANKS_PER_GPU", "0")], "MGRUN_RANKS_PER_GPU=0"),
            (&[("MGRUN_DEVICE", "cuda"), ("MGRUN_CUDA_DEVICE", "-1")], "MGRUN_CUDA_DEVICE=\"-1\""),
            (&[("MGRUN_COMM_TIMEOUT_S", "-3")], "MGRUN_COMM_TIMEOUT_S=\"-3\""),
        ];
        for (vars, expected) in cases {
            let error = parse(vars, false).unwrap_err().to_string();
            assert!(error.contains(expected), "{vars:?}: {error}");
        }
    }
}
