//! Distributed evaluation: every rank scores a strided share of every domain's in and out split,
//! and the correct/total counts and the out splits' cross-entropy sums are all-reduced.

use crate::config::JobConfig;
use crate::records::DomainAccuracy;
use anyhow::{Context, Result};
use mgrun_collectives::{scalars, Communicator, ReduceOp};
use mgrun_data::{load_eval_batch, Dataset};
use mgrun_models::Model;
use tch::{Device, Kind};

/// One evaluation of the model, identical on every rank.
pub struct Evaluation {
    pub accuracy: Vec<DomainAccuracy>,
    /// Per domain (all of them, by index): the summed cross-entropy over its out split and the number
    /// of images summed.
    pub out_loss_sums: Vec<(f64, f64)>,
}

impl Evaluation {
    /// swad's `tr_outloss`: the mean over the training domains of each domain's mean cross-entropy on
    /// its out split (each domain weighted equally, whatever its size).
    pub fn train_out_loss(&self, train_domains: &[usize]) -> f64 {
        let means: Vec<f64> = train_domains
            .iter()
            .filter_map(|&d| self.out_loss_sums.get(d))
            .filter(|(_, count)| *count > 0.0)
            .map(|(sum, count)| sum / count)
            .collect();
        if means.is_empty() {
            return f64::NAN;
        }
        means.iter().sum::<f64>() / means.len() as f64
    }
}

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

    /// Accuracy of every domain's in and out split and the out splits' losses, in eval mode without
    /// gradients.
    pub fn run(&self, model: &dyn Model, dataset: &Dataset, world: &dyn Communicator) -> Result<Evaluation> {
        let _no_grad = tch::no_grad_guard();
        let (rank, size) = (world.rank(), world.world_size());
        let domains = dataset.domains();
        // [correct, total] for the in and the out split of each domain, then one cross-entropy sum
        // per domain's out split (its count is the out split's total), in one all-reduce.
        let loss_base = domains.len() * 4;
        let mut counts = vec![0f64; domains.len() * 5];
        for (d, domain) in domains.iter().enumerate() {
            for (s, split) in [&domain.in_split, &domain.out_split].into_iter().enumerate() {
                let mine: Vec<usize> = split.iter().skip(rank).step_by(size).copied().collect();
                for chunk in mine.chunks(self.batch_size.max(1)) {
                    let (x, y) = load_eval_batch(dataset, d, chunk, self.image_size)?;
                    let logits = model.forward_t(&x.to_device(self.device), false);
                    let y = y.to_device(self.device);
                    let correct = logits.argmax(-1, false).eq_tensor(&y);
                    if s == 1 {
                        // In f32 whatever the forward precision, summed in f64.
                        let losses = logits.to_kind(Kind::Float).cross_entropy_loss::<tch::Tensor>(
                            &y,
                            None,
                            tch::Reduction::None,
                            -100,
                            0.0,
                        );
                        counts[loss_base + d] += losses.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                    }
                    counts[d * 4 + s * 2] += correct.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
                    counts[d * 4 + s * 2 + 1] += chunk.len() as f64;
                }
            }
        }
        let counts =
            scalars::all_reduce_f64(world, &counts, ReduceOp::Sum).context("all-reduce of the accuracy counts")?;
        let test = dataset.test_domains();
        let out_loss_sums = (0..domains.len()).map(|d| (counts[loss_base + d], counts[d * 4 + 3])).collect();
        let accuracy = domains
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
            .collect();
        Ok(Evaluation { accuracy, out_loss_sums })
    }
}
