//! Writes the synthetic dataset: `cargo run --release -p mgrun-data --example synthetic_datagen -- OUT [SEED]`.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "datasets/synthetic".into());
    let seed = args.next().map(|s| s.parse()).transpose()?.unwrap_or(0);
    let opts = mgrun_data::synthetic::SyntheticOptions { out: out.into(), seed, ..Default::default() };
    println!("{}", mgrun_data::synthetic::generate(&opts)?);
    Ok(())
}
