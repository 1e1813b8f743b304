//! Sharding invariance in one process: ranks are threads joined by an in-memory communicator.
//! Whole domains spread over 2 ranks, and each domain split over 2 ranks (6 ranks, domain groups),
//! must give the same weights as all 3 domains on a single rank.

use mgrun_collectives::{CommError, Communicator, ReduceOp, SingleRank};
use mgrun_methods::dsp_reg::DspMode;
use mgrun_methods::{build, Adam, AdamConfig, DomainShard, DspRegConfig, MethodConfig, Topology, UpdateContext};
use mgrun_models::ModelSpec;
use std::sync::{Arc, Barrier, Mutex};
use tch::{Device, Kind, Tensor};

/// Ranks of one group exchange tensors through shared slots; every rank sums them in rank order.
struct Shared {
    slots: Mutex<Vec<Option<Tensor>>>,
    barrier: Barrier,
}

struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

fn group(size: usize) -> Vec<ThreadComm> {
    let shared = Arc::new(Shared { slots: Mutex::new((0..size).map(|_| None).collect()), barrier: Barrier::new(size) });
    (0..size).map(|rank| ThreadComm { rank, shared: shared.clone() }).collect()
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.slots.lock().unwrap().len()
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_reduce(&self, tensor: &mut Tensor, op: ReduceOp) -> mgrun_collectives::Result<()> {
        assert_eq!(op, ReduceOp::Sum);
        self.shared.slots.lock().unwrap()[self.rank] = Some(tensor.copy());
        self.shared.barrier.wait();
        let total = {
            let slots = self.shared.slots.lock().unwrap();
            let mut total = slots[0].as_ref().unwrap().copy();
            for t in slots.iter().skip(1) {
                total += t.as_ref().unwrap();
            }
            total
        };
        self.shared.barrier.wait();
        tensor.copy_(&total);
        Ok(())
    }
    fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> mgrun_collectives::Result<()> {
        Err(CommError::Invalid { op: "broadcast", message: "not needed by methods".into() })
    }
    fn all_gather(&self, _tensor: &Tensor) -> mgrun_collectives::Result<Tensor> {
        Err(CommError::Invalid { op: "all_gather", message: "not needed by methods".into() })
    }
    fn barrier(&self) -> mgrun_collectives::Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn split(&self, _color: usize) -> mgrun_collectives::Result<Box<dyn Communicator>> {
        Err(CommError::Invalid { op: "split", message: "groups are built directly in this test".into() })
    }
}

const STEPS: u64 = 3;
const BATCH: i64 = 4;

fn spec() -> ModelSpec {
    ModelSpec { arch: "small_cnn".into(), num_classes: 5, freeze_bn: false, dropout: 0.0, width: 8 }
}

/// `[step][domain]` batches of BATCH images, as plain vectors (tch tensors are not `Sync`).
type Batches = Vec<Vec<(Vec<f32>, Vec<i64>)>>;

fn batches() -> Batches {
    tch::manual_seed(21);
    (0..STEPS)
        .map(|_| {
            (0..3)
                .map(|_| {
                    let x = Tensor::randn([BATCH * 3 * 8 * 8], (Kind::Float, Device::Cpu));
                    let y = Tensor::randint(5, [BATCH], (Kind::Int64, Device::Cpu));
                    (Vec::<f32>::try_from(&x).unwrap(), Vec::<i64>::try_from(&y).unwrap())
                })
                .collect()
        })
        .collect()
}

/// One rank's run: `assignment[step]` gives (domain, first image, images) of its shards.
fn run_rank(
    cfg: &MethodConfig,
    weights: &[f32],
    data: &Batches,
    parts: &[(usize, i64, i64)],
    world: &dyn Communicator,
    domain_group: Option<&dyn Communicator>,
) -> (Vec<f32>, Vec<f64>) {
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(&Tensor::from_slice(weights)).unwrap();
    let mut method = build(cfg, &*model, 3).unwrap();
    let mut adam = Adam::new(AdamConfig { lr: 1e-2, ..AdamConfig::default() }, model.store().numel(), Device::Cpu);
    let topology = Topology {
        world,
        domain_group,
        num_domains: 3,
        batch_per_domain: BATCH as usize,
        bucket_bytes: 4096,
        deterministic: false,
    };
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let shards: Vec<DomainShard> = parts
            .iter()
            .map(|&(domain, start, len)| {
                let (x, y) = &data[step as usize][domain];
                let x = Tensor::from_slice(x).view([BATCH, 3, 8, 8]);
                let y = Tensor::from_slice(y);
                DomainShard { domain, x: x.narrow(0, start, len), y: y.narrow(0, start, len) }
            })
            .collect();
        let mut ctx =
            UpdateContext { model: &mut *model, optimizer: &mut adam, topology: &topology, step, total_steps: STEPS };
        losses.push(method.update(&mut ctx, &shards).unwrap().loss);
    }
    (Vec::<f32>::try_from(model.store().flat()).unwrap(), losses)
}

fn check_invariance(cfg: MethodConfig) {
    let data = batches();
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    let whole: Vec<(usize, i64, i64)> = (0..3).map(|d| (d, 0, BATCH)).collect();
    let (single, single_losses) = run_rank(&cfg, &weights, &data, &whole, &SingleRank, None);
    let single = Tensor::from_slice(&single);

    let compare = |label: &str, results: Vec<(Vec<f32>, Vec<f64>)>| {
        for (rank, (flat, losses)) in results.iter().enumerate() {
            let flat = Tensor::from_slice(flat);
            let err = (&flat - &single).norm().double_value(&[]) / single.norm().double_value(&[]);
            assert!(err < 1e-5, "{} {label}: rank {rank} weights differ by {err:e}", cfg.name);
            for (a, b) in losses.iter().zip(&single_losses) {
                assert!((a - b).abs() < 1e-5 * b.abs(), "{} {label}: rank {rank} loss {a} vs {b}", cfg.name);
            }
        }
    };

    // Whole domains on 2 ranks: {0, 1} and {2}.
    let world = group(2);
    let assignment = [vec![(0, 0, BATCH), (1, 0, BATCH)], vec![(2, 0, BATCH)]];
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = world
            .iter()
            .zip(&assignment)
            .map(|(comm, parts)| s.spawn(|| run_rank(&cfg, &weights, &data, parts, comm, None)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    compare("2 ranks, whole domains", results);

    // Each domain split over 2 ranks: rank r holds half of domain r / 2; groups {0,1}, {2,3}, {4,5}.
    let world = group(6);
    let groups: Vec<Vec<ThreadComm>> = (0..3).map(|_| group(2)).collect();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = world
            .iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (domain, half) = (rank / 2, rank % 2);
                let domain_group = &groups[domain][half];
                let parts = vec![(domain, half as i64 * BATCH / 2, BATCH / 2)];
                let (cfg, weights, data) = (&cfg, &weights, &data);
                s.spawn(move || run_rank(cfg, weights, data, &parts, comm, Some(domain_group as &dyn Communicator)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    compare("6 ranks, split domains", results);
}

#[test]
fn erm_is_invariant_to_sharding() {
    check_invariance(MethodConfig { name: "erm".into(), ..MethodConfig::default() });
}

#[test]
fn sam_global_is_invariant_to_sharding() {
    check_invariance(MethodConfig { name: "sam".into(), ..MethodConfig::default() });
}

#[test]
fn dsp_reg_is_invariant_to_sharding() {
    let dsp_reg = DspRegConfig {
        mode: DspMode::Anchor,
        lambda: 10.0,
        warmup_frac: 0.0,
        ramp_frac: 0.0,
        ..DspRegConfig::default()
    };
    check_invariance(MethodConfig { name: "dsp_reg".into(), dsp_reg, ..MethodConfig::default() });
}
