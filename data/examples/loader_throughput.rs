//! Measures the training loader: `cargo run --release -p mgrun-data --example loader_throughput -- ROOT [SIZE]`.
//! Loads 3 training domains x 32 images per step, with and without the in-memory image cache.

use mgrun_data::{DataConfig, Dataset, Loader, ShardSpec};
use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let root = args.next().unwrap_or_else(|| "datasets/synthetic".into());
    let image_size = args.next().map(|s| s.parse()).transpose()?.unwrap_or(32);
    for cache_mb in [1024, 0] {
        let cfg = DataConfig { root: root.clone().into(), image_size, cache_mb, ..DataConfig::default() };
        let dataset = Arc::new(Dataset::open(&cfg)?);
        let shards: Vec<ShardSpec> = dataset.train_domains()[..3]
            .iter()
            .enumerate()
            .map(|(e, &d)| ShardSpec { train_domain: e, domain: d, lo: 0, hi: cfg.batch_per_domain })
            .collect();
        let mut loader = Loader::new(dataset.clone(), shards, &cfg, 0, 0)?;
        let steps = 300;
        let started = Instant::now();
        for _ in 0..steps {
            loader.next()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "cache {:5}: {steps} steps of 96 images at {image_size}px in {seconds:.2}s = {:.0} steps/s, {:.0} img/s",
            dataset.is_cached(),
            steps as f64 / seconds,
            steps as f64 * 96.0 / seconds
        );
    }
    Ok(())
}
