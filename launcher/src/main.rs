//! `mgrun`: launches a distributed training job (one rank per GPU or N CPU ranks) and runs its workers.
//!
//! The same executable is both the launcher and, through hidden subcommands, every rank it spawns.

mod bench_cmd;
mod bench_scaling;
mod cli;
mod console;
mod cuda;
mod data_cmd;
mod job;
mod launch;
mod methods_cmd;
mod placement;
mod plot;
mod progress_display;
mod rendezvous;
mod run_dir;
mod selftest;
mod slurm;
mod sweep_cmd;
mod train_cmd;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, DataCommand, LaunchArgs};
use crate::console::say;

fn main() -> ExitCode {
    // Before anything touches tch, in every mode, so that workers see the GPUs too.
    let cuda_load_error = cuda::load_torch_cuda();
    let cli = Cli::parse();
    match run(cli, cuda_load_error.as_deref()) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            say!("mgrun: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    match cli.command {
        None => train_cmd::launch_training(cli, cuda_load_error),
        Some(command) => {
            if let Some(config) = &cli.config {
                anyhow::bail!("unexpected CONFIG {} together with a subcommand", config.display());
            }
            run_command(command, &cli.launch, cuda_load_error)
        }
    }
}

/// Runs a subcommand; `top_launch` holds the launch options given before it.
fn run_command(command: Command, top_launch: &LaunchArgs, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    match command {
        Command::Bench { which } => bench_cmd::run(which, top_launch, cuda_load_error),
        Command::Data { which: DataCommand::Inspect { config, overrides, splits, trial_seed, threads } } => {
            data_cmd::inspect(&config, &overrides, splits.as_deref(), trial_seed, threads)
        }
        Command::Datagen { which } => data_cmd::datagen(which),
        Command::Sweep(args) => sweep_cmd::sweep(args),
        Command::Collect(args) => sweep_cmd::collect(args),
        Command::Plot(args) => plot::plot(args, top_launch.out.as_deref()),
        Command::Methods => {
            methods_cmd::print_methods()?;
            Ok(0)
        }
        Command::Selftest(args) => selftest::launch_selftest(&args, top_launch, cuda_load_error),
        Command::Worker { out, config } => {
            let outcome = mgrun_trainer::run_worker(&mgrun_trainer::WorkerArgs { config, out_dir: out })?;
            Ok(outcome.exit_code())
        }
        Command::BenchWorker { max_bytes, json } => {
            mgrun_collectives::bench::bench_worker_main(max_bytes, json.as_deref())?;
            Ok(0)
        }
        Command::SelftestWorker(args) => {
            selftest::selftest_worker_main(&args)?;
            Ok(0)
        }
    }
}
