//! Distributed evaluation: every rank scores a strided share of every domain's in and out split,
//! and the correct/total counts are all-reduced.

use crate::config::JobConfig;
use crate::records::DomainAccuracy;
use anyhow::{Context, Result};
use mgrun_collectives::{scalars, Communicator, ReduceOp};
use mgrun_data::{load_eval_batch, Dataset};
use mgrun_models::Model;
use tch::{Device, Kind};

pub struct Evaluator {
    batch_size: usize,
    image_size: i64,
    device: Device,
    every_steps: u64,
    total_steps: u64,
}

impl Evaluator {
    pub fn new(config: &JobConfig, device: Device) -> Evaluator {
        Evaluator {
            batch_size: config.eval.batch_size,
            image_size: config.data.image_size,
            device,
            every_steps: config.eval.every_steps,
            total_steps: config.train.steps,
        }
    }

    /// After step 0, every `eval.every_steps` steps and after the last step (DomainBed's checkpoint_freq).
    pub fn due(&self, step: u64) -> bool {
        step.is_multiple_of(self.every_steps) || step + 1 == self.total_steps
    }

    /// Accuracy of every domain's in and out split, identical on every rank.
    pub fn run(&self, model: &dyn Model, dataset: &Dataset, world: &dyn Communicator) -> Result<Vec<DomainAccuracy>> {
        let _no_grad = tch::no_grad_guard();
        let (rank, size) = (world.rank(), world.world_size());
        let domains = dataset.domains();
        // [correct, total] for the in and the out split of each domain.
        let mut counts = vec![0f64; domains.len() * 4];
        for (d, domain) in domains.iter().enumerate() {
            for (s, split) in [&domain.in_split, &domain.out_split].into_iter().enumerate() {
                let mine: Vec<usize> = split.iter().skip(rank).step_by(size).copied().collect();
                for chunk in mine.chunks(self.batch_size.max(1)) {
                    let (x, y) = load_eval_batch(dataset, d, chunk, self.image_size)?;
                    let logits = model.forward_t(&x.to_device(self.device), false);
                    let correct = logits.argmax(-1, false).eq_tensor(&y.to_device(self.device));
                    counts[d * 4 + s * 2] += correct.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                    counts[d * 4 + s * 2 + 1] += chunk.len() as f64;
                }
            }
        }
        let counts =
            scalars::all_reduce_f64(world, &counts, ReduceOp::Sum).context("all-reduce of the accuracy counts")?;
        let test = dataset.test_domains();
        Ok(domains
            .iter()
            .enumerate()
            .map(|(d, domain)| {
                let acc = |c: f64, t: f64| if t > 0.0 { c / t } else { 0.0 };
                DomainAccuracy {
                    domain: d,
                    name: domain.name.clone(),
                    is_test: test.contains(&d),
                    in_acc: acc(counts[d * 4], counts[d * 4 + 1]),
                    out_acc: acc(counts[d * 4 + 2], counts[d * 4 + 3]),
                }
            })
            .collect())
    }
}
