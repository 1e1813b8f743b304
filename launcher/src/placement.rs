//! Where a job's ranks run: this launcher's place among the launchers (one per node, or one per Slurm
//! task) and the ranks it starts, from the command line and, inside Slurm, the allocation.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use mgrun_collectives::DeviceKind;

use crate::launch::LocalRank;
use crate::rendezvous::RendezvousPlan;
use crate::slurm::SlurmAllocation;

/// Seconds every launcher has to join, unless `--rdzv-timeout-s` says otherwise (torchrun's is 900).
const DEFAULT_RDZV_TIMEOUT_S: f64 = 300.0;
const LOOPBACK: &str = "127.0.0.1";

/// The launch options that decide placement (the command line's, as given).
#[derive(Debug, Clone, Default)]
pub struct PlacementRequest {
    pub gpus: Option<usize>,
    pub cpus: Option<usize>,
    pub ranks_per_gpu: usize,
    pub nnodes: Option<usize>,
    pub node_rank: Option<usize>,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    pub rdzv_timeout_s: Option<f64>,
    pub slurm_task: bool,
}

/// The Slurm context of this process: the allocation, and whether it runs inside a job step (`srun`).
#[derive(Debug, Clone)]
pub struct SlurmContext {
    pub allocation: SlurmAllocation,
    pub in_step: bool,
}

impl SlurmContext {
    pub fn from_env() -> Result<Option<SlurmContext>> {
        let in_step = std::env::var_os("SLURM_STEP_ID").is_some();
        Ok(SlurmAllocation::from_env()?.map(|allocation| SlurmContext { allocation, in_step }))
    }
}

#[derive(Debug, Clone)]
pub struct Placement {
    pub device: DeviceKind,
    pub world_size: usize,
    /// GPUs (or CPU rank slots) per node, for the GPU check.
    pub per_node: usize,
    pub local: Vec<LocalRank>,
    pub local_world_size: usize,
    pub group_rank: usize,
    pub group_world_size: usize,
    pub rendezvous: RendezvousPlan,
    /// `scontrol requeue` target after a preemption.
    pub requeue_target: Option<String>,
    /// How the placement was decided, for the launch message.
    pub source: String,
}

pub fn place(request: &PlacementRequest, slurm: Option<&SlurmContext>) -> Result<Placement> {
    let timeout_s = request.rdzv_timeout_s.unwrap_or(DEFAULT_RDZV_TIMEOUT_S);
    ensure!(timeout_s.is_finite() && timeout_s > 0.0, "--rdzv-timeout-s must be a positive number of seconds");
    let timeout = Duration::from_secs_f64(timeout_s);
    ensure!(request.ranks_per_gpu > 0, "--ranks-per-gpu must be at least 1");
    if request.slurm_task {
        let Some(slurm) = slurm.filter(|s| s.in_step) else {
            bail!("--slurm-task runs one rank per Slurm task: start it with srun inside a Slurm job (SLURM_STEP_ID is unset)");
        };
        return place_slurm_task(request, &slurm.allocation, timeout);
    }
    // Inside `srun` without explicit node options, the allocation says where the nodes are.
    let from_slurm = slurm.filter(|s| request.nnodes.is_none() && (s.in_step || s.allocation.nnodes > 1));
    let (nnodes, node_rank, master_addr, master_port, source) = match from_slurm {
        Some(SlurmContext { allocation, in_step: false }) => bail!(
            "this Slurm allocation has {} nodes but mgrun runs outside srun, so only one node would train: start it \
             with `srun --ntasks-per-node=1 mgrun ...` (one launcher per node) or `srun --ntasks-per-node=G mgrun \
             --slurm-task ...` (one task per rank)",
            allocation.nnodes
        ),
        Some(SlurmContext { allocation, .. }) => {
            if !allocation.is_one_task_per_node() {
                bail!(
                    "srun started {} tasks on {} node(s), but mgrun starts every rank of its node itself: use \
                     `srun --ntasks-per-node=1`, or add --slurm-task to make each task one rank",
                    allocation.ntasks.unwrap_or(0),
                    allocation.nnodes
                );
            }
            (
                allocation.nnodes,
                allocation.node_id.unwrap_or(0),
                request.master_addr.clone().unwrap_or_else(|| allocation.master_addr().to_string()),
                Some(request.master_port.unwrap_or_else(|| allocation.master_port())),
                format!(
                    "Slurm job {}, node {} of {}",
                    allocation.job_id,
                    allocation.node_id.unwrap_or(0),
                    allocation.nnodes
                ),
            )
        }
        None => {
            let nnodes = request.nnodes.unwrap_or(1);
            ensure!(nnodes > 0, "--nnodes must be at least 1");
            let node_rank = request.node_rank.unwrap_or(0);
            if node_rank >= nnodes {
                bail!("--node-rank {node_rank} is out of range for --nnodes {nnodes} (node ranks 0..{})", nnodes - 1);
            }
            if nnodes > 1 && request.master_addr.is_none() {
                bail!("--nnodes {nnodes}: give --master-addr (the host of node 0, reachable from every node)");
            }
            if nnodes > 1 && request.master_port.is_none() {
                bail!("--nnodes {nnodes}: give --master-port (a free port on node 0, the same on every node)");
            }
            let addr = request.master_addr.clone().unwrap_or_else(|| LOOPBACK.to_string());
            let source = if nnodes > 1 { format!("node {node_rank} of {nnodes}") } else { String::new() };
            (nnodes, node_rank, addr, request.master_port, source)
        }
    };

    let (device, per_node) = match (request.gpus, request.cpus) {
        (Some(gpus), _) => (DeviceKind::Cuda, gpus),
        (None, Some(cpus)) => (DeviceKind::Cpu, cpus),
        (None, None) => match slurm.and_then(|s| s.allocation.gpus_on_node).filter(|g| *g > 0) {
            Some(gpus) => (DeviceKind::Cuda, gpus),
            None => (DeviceKind::Cpu, 1),
        },
    };
    ensure!(per_node > 0, "--gpus/--cpus must be at least 1");
    let local = (0..per_node)
        .map(|local_rank| LocalRank {
            rank: node_rank * per_node + local_rank,
            local_rank,
            cuda_device: local_rank / request.ranks_per_gpu,
        })
        .collect();
    let listen_on_all = nnodes > 1 || request.master_addr.as_deref().is_some_and(|a| a != LOOPBACK && a != "localhost");
    Ok(Placement {
        device,
        world_size: nnodes * per_node,
        per_node,
        local,
        local_world_size: per_node,
        group_rank: node_rank,
        group_world_size: nnodes,
        rendezvous: RendezvousPlan {
            launchers: nnodes,
            launcher_rank: node_rank,
            launcher_kind: "node",
            master_addr,
            master_port: master_port.unwrap_or(0),
            listen_on_all,
            timeout,
        },
        requeue_target: slurm.map(|s| s.allocation.requeue_target()),
        source,
    })
}

/// `srun ... mgrun --slurm-task`: this process's launcher starts exactly one rank, the task's.
fn place_slurm_task(request: &PlacementRequest, allocation: &SlurmAllocation, timeout: Duration) -> Result<Placement> {
    let (Some(procid), Some(localid), Some(ntasks)) = (allocation.procid, allocation.localid, allocation.ntasks) else {
        bail!("--slurm-task: SLURM_PROCID, SLURM_LOCALID or SLURM_NTASKS is unset; start mgrun with srun");
    };
    if request.nnodes.is_some() || request.node_rank.is_some() {
        bail!("--slurm-task takes the ranks from Slurm: drop --nnodes and --node-rank");
    }
    let device = match (request.gpus, request.cpus) {
        (Some(1), _) => DeviceKind::Cuda,
        (None, Some(1) | None) => DeviceKind::Cpu,
        _ => bail!("--slurm-task: each task is one rank: give --gpus 1 (a GPU per task) or --cpus 1 (or neither)"),
    };
    // With --gpus-per-task=1 Slurm makes the task's own GPU device 0; otherwise the task takes its local id.
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default();
    let cuda_device = if !visible.is_empty() && visible.split(',').count() == 1 { 0 } else { localid };
    let tasks_here = allocation
        .tasks_per_node
        .get(allocation.node_id.unwrap_or(0))
        .copied()
        .unwrap_or(ntasks / allocation.nnodes.max(1));
    Ok(Placement {
        device,
        world_size: ntasks,
        per_node: 1,
        local: vec![LocalRank { rank: procid, local_rank: localid, cuda_device }],
        local_world_size: tasks_here,
        group_rank: allocation.node_id.unwrap_or(0),
        group_world_size: allocation.nnodes,
        rendezvous: RendezvousPlan {
            launchers: ntasks,
            launcher_rank: procid,
            launcher_kind: "task",
            master_addr: request.master_addr.clone().unwrap_or_else(|| allocation.master_addr().to_string()),
            master_port: request.master_port.unwrap_or_else(|| allocation.master_port()),
            listen_on_all: true,
            timeout,
        },
        requeue_target: Some(allocation.requeue_target()),
        source: format!("Slurm job {}, task {procid} of {ntasks}", allocation.job_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn slurm(vars: &[(&str, &str)], in_step: bool) -> SlurmContext {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let allocation = SlurmAllocation::from_lookup(|name| vars.get(name).cloned())
            .expect("a valid allocation")
            .expect("SLURM_JOB_ID is set");
        SlurmContext { allocation, in_step }
    }

    const TWO_NODES: [(&str, &str); 5] = [
        ("SLURM_JOB_ID", "987654"),
        ("SLURM_JOB_NODELIST", "gpu-a[07-08]"),
        ("SLURM_JOB_NUM_NODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_NTASKS", "2"),
    ];

    #[test]
    fn nodes_own_consecutive_global_ranks() {
        let request = PlacementRequest {
            cpus: Some(3),
            ranks_per_gpu: 1,
            nnodes: Some(2),
            node_rank: Some(1),
            master_addr: Some("10.0.0.1".into()),
            master_port: Some(29500),
            ..PlacementRequest::default()
        };
        let place = place(&request, None).unwrap();
        assert_eq!(place.world_size, 6);
        let ranks: Vec<(usize, usize)> = place.local.iter().map(|r| (r.rank, r.local_rank)).collect();
        assert_eq!(ranks, [(3, 0), (4, 1), (5, 2)]);
        assert_eq!((place.group_rank, place.group_world_size, place.local_world_size), (1, 2, 3));
        assert!(place.rendezvous.listen_on_all);
        assert_eq!(place.requeue_target, None);
    }

    #[test]
    fn under_srun_the_allocation_places_the_node_and_its_gpus() {
        let mut vars = TWO_NODES.to_vec();
        vars.push(("SLURM_GPUS_ON_NODE", "4"));
        let request = PlacementRequest { ranks_per_gpu: 1, ..PlacementRequest::default() };
        let place = place(&request, Some(&slurm(&vars, true))).unwrap();
        assert_eq!(place.device, DeviceKind::Cuda);
        assert_eq!(place.world_size, 8);
        assert_eq!(place.local.first().map(|r| (r.rank, r.cuda_device)), Some((4, 0)));
        assert_eq!(place.rendezvous.master_addr, "gpu-a07");
        assert_eq!(place.rendezvous.master_port, 15000 + 7654);
        assert_eq!(place.requeue_target.as_deref(), Some("987654"));
    }

    #[test]
    fn a_multi_node_allocation_outside_srun_is_refused() {
        let request = PlacementRequest { cpus: Some(1), ranks_per_gpu: 1, ..PlacementRequest::default() };
        let error = place(&request, Some(&slurm(&TWO_NODES, false))).unwrap_err().to_string();
        assert!(error.contains("outside srun") && error.contains("--ntasks-per-node=1"), "{error}");
        // Several tasks per node need --slurm-task.
        let mut vars = TWO_NODES.to_vec();
        vars[4] = ("SLURM_NTASKS", "8");
        vars.push(("SLURM_TASKS_PER_NODE", "4(x2)"));
        let error = place(&request, Some(&slurm(&vars, true))).unwrap_err().to_string();
        assert!(error.contains("8 tasks on 2 node(s)") && error.contains("--slurm-task"), "{error}");
    }

    #[test]
    fn a_slurm_task_is_one_rank_with_slurms_identity() {
        let mut vars = TWO_NODES.to_vec();
        vars[4] = ("SLURM_NTASKS", "8");
        vars.extend([("SLURM_TASKS_PER_NODE", "4(x2)"), ("SLURM_PROCID", "6"), ("SLURM_LOCALID", "2")]);
        let request = PlacementRequest { cpus: Some(1), ranks_per_gpu: 1, slurm_task: true, ..Default::default() };
        let place = place(&request, Some(&slurm(&vars, true))).unwrap();
        assert_eq!(place.world_size, 8);
        // (The GPU index also depends on this process's CUDA_VISIBLE_DEVICES.)
        assert_eq!(place.local.iter().map(|r| (r.rank, r.local_rank)).collect::<Vec<_>>(), [(6, 2)]);
        assert_eq!((place.group_rank, place.local_world_size), (1, 4));
        assert_eq!((place.rendezvous.launchers, place.rendezvous.launcher_rank), (8, 6));
        assert_eq!(place.rendezvous.launcher_kind, "task");
        let outside = place_outside(&request);
        assert!(outside.contains("start it with srun"), "{outside}");
    }

    fn place_outside(request: &PlacementRequest) -> String {
        place(request, None).unwrap_err().to_string()
    }
}
