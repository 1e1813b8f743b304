//! A diagnostic worker for testing the launcher without the trainer: every rank reports its environment,
//! meets the others at a barrier in the rendezvous store, runs a little, then exits 0, except for an optional
//! rank that fails on purpose in a chosen way.

use std::ffi::OsString;
use std::time::Duration;

use anyhow::Context;
use mgrun_collectives::rank_env::var;
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::RankEnv;

use crate::cli::LaunchArgs;
use crate::console::say;
use crate::job::{launch_job, WorkerCommand};

/// Environment variables a rank reports, as it finds them: torchrun's contract plus mgrun's own.
const REPORTED_ENV: [&str; 14] = [
    var::RANK,
    var::LOCAL_RANK,
    var::WORLD_SIZE,
    var::LOCAL_WORLD_SIZE,
    var::GROUP_RANK,
    var::GROUP_WORLD_SIZE,
    var::RESTART_COUNT,
    var::STORE_NAMESPACE,
    var::MASTER_ADDR,
    var::MASTER_PORT,
    var::DEVICE,
    var::JOB_ID,
    "OMP_NUM_THREADS",
    var::STORE_TOKEN,
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

/// `mgrun selftest`: launches selftest ranks (`mgrun selftest-worker`) like a job.
pub fn launch_selftest(args: &SelftestArgs, launch: &LaunchArgs, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    let out_dir = launch.out.clone().unwrap_or_else(|| crate::launch::default_out_dir("selftest"));
    let mut worker_args: Vec<OsString> = vec!["selftest-worker".into()];
    worker_args.extend(args.to_args().into_iter().map(OsString::from));
    let agreement = format!("{worker_args:?}");
    let worker =
        WorkerCommand { args: worker_args, rank_config: None, agreement, run_dir: None, check_world_size: None };
    launch_job(launch, out_dir, worker, cuda_load_error)
}

/// Runs one selftest rank; the launcher provides the environment.
pub fn selftest_worker_main(args: &SelftestArgs) -> anyhow::Result<()> {
    let env = RankEnv::from_launcher_env().context("selftest worker")?;
    let (rank, world_size) = (env.rank, env.world_size);
    let pid = std::process::id();
    println!("selftest rank {rank} of {world_size}: hello on stdout (pid {pid})");
    say!("selftest rank {rank} of {world_size}: hello on stderr");
    let env_report: Vec<String> = REPORTED_ENV
        .iter()
        .map(|name| {
            let value = std::env::var(name).unwrap_or_else(|_| "<unset>".to_string());
            // The token is a secret: report only whether it is there.
            let shown = if *name == var::STORE_TOKEN && value != "<unset>" { "<set>".to_string() } else { value };
            format!("{name}={shown}")
        })
        .collect();
    println!("selftest env {}", env_report.join(" "));

    let store =
        StoreClient::connect_rank(&env, Duration::from_secs(30)).context("selftest worker: connecting to the store")?;
    let arrived = store.add("selftest/arrived", 1).context("selftest worker: barrier add")?;
    if usize::try_from(arrived).ok() == Some(world_size) {
        store.set("selftest/all_arrived", b"1").context("selftest worker: barrier release")?;
    }
    store.get("selftest/all_arrived").context("selftest worker: barrier wait")?;
    println!("selftest rank {rank}: passed the barrier");

    if args.fail_rank == Some(rank) && args.fail_attempts.is_none_or(|attempts| env.restart_count < attempts) {
        std::thread::sleep(Duration::from_millis(args.fail_after_ms));
        match args.fail_how {
            FailHow::Exit => {
                say!("selftest rank {rank}: failing on purpose with exit code 3");
                std::process::exit(3);
            }
            FailHow::Sigkill => {
                say!("selftest rank {rank}: killing itself with SIGKILL");
                // SAFETY: plain kill(2) on our own pid.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            FailHow::Hang => {
                say!("selftest rank {rank}: hanging, ignoring SIGTERM");
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
