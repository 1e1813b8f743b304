//! Multi-process tests of the TCP backend: the test hosts the rendezvous store and spawns one
//! `mgrun-comm-check` process per rank with torchrun-style environment variables. Each rank checks its
//! results against a sequentially computed reference and prints OK/FAIL lines.

use mgrun_collectives::store::StoreServer;
use mgrun_collectives::RankEnv;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "multiprocess-test-token";

struct World {
    _server: StoreServer,
    outputs: Vec<Output>,
    elapsed: Duration,
}

fn run_world(world: usize, args: &[&str], timeout_s: f64, limit: Duration) -> World {
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), TOKEN.to_string()).unwrap();
    let start = Instant::now();
    let children: Vec<Child> = (0..world)
        .map(|rank| {
            let env = RankEnv {
                rank,
                local_rank: rank,
                world_size: world,
                local_world_size: world,
                master_addr: Some("127.0.0.1".to_string()),
                master_port: Some(server.addr().port()),
                store_token: Some(TOKEN.to_string()),
                comm_timeout: Some(Duration::from_secs_f64(timeout_s)),
                // CPU ranks, whatever this process's environment says.
                ..RankEnv::single_rank()
            };
            Command::new(env!("CARGO_BIN_EXE_mgrun-comm-check"))
                .args(args)
                .envs(env.vars())
                .env_remove("MGRUN_ADVERTISE_ADDR")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // A watchdog so a hang fails the test instead of blocking the suite.
    let pids: Vec<u32> = children.iter().map(|child| child.id()).collect();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            for pid in pids {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
            return true;
        }
        false
    });
    let outputs: Vec<Output> = children.into_iter().map(|child| child.wait_with_output().unwrap()).collect();
    let _ = done_tx.send(());
    let elapsed = start.elapsed();
    assert!(
        !watchdog.join().unwrap(),
        "world of {world} ({args:?}) hung for {limit:?}; outputs: {}",
        describe(&outputs)
    );
    World { _server: server, outputs, elapsed }
}

fn describe(outputs: &[Output]) -> String {
    outputs
        .iter()
        .enumerate()
        .map(|(rank, output)| {
            format!(
                "\n--- rank {rank} ({}) ---\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .collect()
}

fn assert_all_passed(world: &World) {
    for (rank, output) in world.outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("all checks passed"),
            "rank {rank} failed:{}",
            describe(&world.outputs)
        );
    }
}

#[test]
fn correctness_world_of_1() {
    assert_all_passed(&run_world(1, &["correctness"], 20.0, Duration::from_secs(60)));
}

#[test]
fn correctness_world_of_2() {
    assert_all_passed(&run_world(2, &["correctness"], 20.0, Duration::from_secs(90)));
}

#[test]
fn correctness_world_of_3() {
    assert_all_passed(&run_world(3, &["correctness"], 20.0, Duration::from_secs(120)));
}

#[test]
fn correctness_world_of_4() {
    assert_all_passed(&run_world(4, &["correctness"], 20.0, Duration::from_secs(120)));
}

/// The device-generic check (what scripts/multi-gpu-check.sh runs on GPUs) on CPU ranks, TCP backend.
#[test]
fn device_correctness_on_cpu_ranks() {
    let world = run_world(3, &["device-correctness"], 20.0, Duration::from_secs(120));
    for (rank, output) in world.outputs.iter().enumerate() {
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.contains("all device checks passed") && stdout.contains("Int64"),
            "rank {rank} failed:{}",
            describe(&world.outputs)
        );
    }
}

/// Parses `RESULT rank=.. elapsed_ms=.. kind=.. error=..` lines of the surviving ranks.
fn failure_reports(world: &World, victim: usize) -> Vec<(usize, u128, String, String)> {
    let mut reports = Vec::new();
    for (rank, output) in world.outputs.iter().enumerate() {
        if rank == victim {
            continue;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout
            .lines()
            .find(|line| line.starts_with("RESULT"))
            .unwrap_or_else(|| panic!("rank {rank} reported no failure:{}", describe(&world.outputs)));
        let field = |name: &str| {
            line.split(' ').find_map(|part| part.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string()
        };
        let error = line.split_once("error=").map(|(_, e)| e.to_string()).unwrap_or_default();
        let kind = format!("{} {}", field("kind"), line.split(' ').find(|p| p.starts_with("peer=")).unwrap_or(""));
        reports.push((rank, field("elapsed_ms").parse().unwrap(), kind, error));
    }
    reports
}

#[test]
fn a_rank_that_dies_is_named_by_every_other_rank_promptly() {
    let timeout_s = 10.0;
    let victim = 2;
    let world = run_world(4, &["fail", "2", "die"], timeout_s, Duration::from_secs(60));
    let reports = failure_reports(&world, victim);
    assert_eq!(reports.len(), 3);
    for (rank, elapsed_ms, kind, error) in reports {
        assert_eq!(kind, "PeerLost peer=2", "rank {rank}: {error}");
        assert!(error.contains("rank 2"), "rank {rank}: {error}");
        // A dead process closes its sockets: detection must not wait for the timeout.
        assert!(elapsed_ms < 3_000, "rank {rank} took {elapsed_ms} ms to notice: {error}");
    }
}

#[test]
fn a_rank_that_stalls_times_out_within_the_timeout() {
    let timeout_s = 2.0;
    let victim = 1;
    let world = run_world(3, &["fail", "1", "stall"], timeout_s, Duration::from_secs(60));
    let reports = failure_reports(&world, victim);
    assert_eq!(reports.len(), 2);
    for (rank, elapsed_ms, kind, error) in reports {
        assert!(kind.ends_with("peer=1"), "rank {rank} blamed the wrong rank: {kind}: {error}");
        assert!(elapsed_ms < 2 * 2_000 + 1_500, "rank {rank} took {elapsed_ms} ms with a 2 s timeout: {error}");
    }
    // Only the stalled rank's sleep bounds the whole run, not the others' error handling.
    assert!(world.elapsed < Duration::from_secs(12), "{:?}", world.elapsed);
}

#[test]
fn bench_worker_prints_a_table_and_writes_json() {
    let dir = std::env::temp_dir().join(format!("mgrun-comm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let json_arg = json_path.to_str().unwrap();
    let world = run_world(2, &["bench", "65536", json_arg], 20.0, Duration::from_secs(60));
    let rank0 = String::from_utf8_lossy(&world.outputs[0].stdout).to_string();
    assert!(world.outputs.iter().all(|o| o.status.success()), "{}", describe(&world.outputs));
    assert!(rank0.contains("| 64 KiB | 16384 |"), "{rank0}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json["world_size"], 2);
    assert_eq!(json["backend"], "tcp");
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4); // 1, 4, 16, 64 KiB
    for row in rows {
        let (algbw, busbw) = (row["algbw_gbps"].as_f64().unwrap(), row["busbw_gbps"].as_f64().unwrap());
        assert!(algbw > 0.0 && (busbw - algbw).abs() < 1e-9, "busbw = algbw at 2 ranks: {row}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
