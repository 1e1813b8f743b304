//! A diagnostic worker for testing the launcher without the trainer: every rank reports its environment,
//! meets the others at a barrier in the rendezvous store, runs a little, then exits 0, except for an optional
//! rank that fails on purpose in a chosen way.

use std::time::Duration;

use anyhow::Context;
use mgrun_collectives::store::StoreClient;

/// Environment variables a rank reports, torchrun's contract plus mgrun's own.
const REPORTED_ENV: [&str; 14] = [
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "MGRUN_RESTART_COUNT",
    "MGRUN_STORE_NAMESPACE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MGRUN_DEVICE",
    "MGRUN_JOB_ID",
    "OMP_NUM_THREADS",
    "MGRUN_STORE_TOKEN",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailHow {
    /// Exit with code 3.
    Exit,
    /// Kill itself with SIGKILL.
    Sigkill,
    /// Ignore SIGTERM and never finish (only SIGKILL stops it).
    Hang,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SelftestArgs {
    /// The rank that fails on purpose.
    #[arg(long)]
    pub fail_rank: Option<usize>,
    /// How long after the barrier the failing rank fails.
    #[arg(long, default_value_t = 0)]
    pub fail_after_ms: u64,
    #[arg(long, value_enum, default_value_t = FailHow::Exit)]
    pub fail_how: FailHow,
    /// The failing rank fails only in the first N attempts (MGRUN_RESTART_COUNT < N) [default: in all].
    #[arg(long, value_name = "N")]
    pub fail_attempts: Option<usize>,
    /// How long the healthy ranks keep running after the barrier.
    #[arg(long, default_value_t = 200)]
    pub run_ms: u64,
}

impl SelftestArgs {
    /// The same options as command-line arguments, to hand to each spawned rank.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--fail-after-ms".to_string(),
            self.fail_after_ms.to_string(),
            "--run-ms".to_string(),
            self.run_ms.to_string(),
            "--fail-how".to_string(),
            match self.fail_how {
                FailHow::Exit => "exit",
                FailHow::Sigkill => "sigkill",
                FailHow::Hang => "hang",
            }
            .to_string(),
        ];
        if let Some(rank) = self.fail_rank {
            args.extend(["--fail-rank".to_string(), rank.to_string()]);
        }
        if let Some(attempts) = self.fail_attempts {
            args.extend(["--fail-attempts".to_string(), attempts.to_string()]);
        }
        args
    }
}

fn env_usize(name: &str) -> anyhow::Result<usize> {
    let value = std::env::var(name).with_context(|| format!("selftest worker: env {name} is not set"))?;
    value.parse().with_context(|| format!("selftest worker: env {name}={value:?} is not a non-negative integer"))
}

/// Runs one selftest rank; the launcher provides the environment.
pub fn selftest_worker_main(args: &SelftestArgs) -> anyhow::Result<()> {
    let rank = env_usize("RANK")?;
    let world_size = env_usize("WORLD_SIZE")?;
    let pid = std::process::id();
    println!("selftest rank {rank} of {world_size}: hello on stdout (pid {pid})");
    eprintln!("selftest rank {rank} of {world_size}: hello on stderr");
    let env_report: Vec<String> = REPORTED_ENV
        .iter()
        .map(|name| {
            let value = std::env::var(name).unwrap_or_else(|_| "<unset>".to_string());
            // The token is a secret: report only whether it is there.
            let shown = if *name == "MGRUN_STORE_TOKEN" && value != "<unset>" { "<set>".to_string() } else { value };
            format!("{name}={shown}")
        })
        .collect();
    println!("selftest env {}", env_report.join(" "));

    let store = StoreClient::from_env(Duration::from_secs(30)).context("selftest worker: connecting to the store")?;
    let arrived = store.add("selftest/arrived", 1).context("selftest worker: barrier add")?;
    if usize::try_from(arrived).ok() == Some(world_size) {
        store.set("selftest/all_arrived", b"1").context("selftest worker: barrier release")?;
    }
    store.get("selftest/all_arrived").context("selftest worker: barrier wait")?;
    println!("selftest rank {rank}: passed the barrier");

    let attempt = std::env::var("MGRUN_RESTART_COUNT").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
    if args.fail_rank == Some(rank) && args.fail_attempts.is_none_or(|attempts| attempt < attempts) {
        std::thread::sleep(Duration::from_millis(args.fail_after_ms));
        match args.fail_how {
            FailHow::Exit => {
                eprintln!("selftest rank {rank}: failing on purpose with exit code 3");
                std::process::exit(3);
            }
            FailHow::Sigkill => {
                eprintln!("selftest rank {rank}: killing itself with SIGKILL");
                // SAFETY: plain kill(2) on our own pid.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            FailHow::Hang => {
                eprintln!("selftest rank {rank}: hanging, ignoring SIGTERM");
                // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
                unsafe {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                }
            }
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    std::thread::sleep(Duration::from_millis(args.run_ms));
    println!("selftest rank {rank}: done");
    Ok(())
}
