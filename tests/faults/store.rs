//! Connections to the job's rendezvous store that are not the job's: probes without the token get no
//! answer and are closed, thousands of idle connections do not stall start-up, and the job trains on.

use crate::harness::{assert_no_leftovers, finish, spawn, LIMIT};
use mgrun_tests::{read_jsonl, synthetic_dataset, write_tiny_job};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// Starts a 2-rank job of `steps` steps and returns it with the store address the launcher printed.
fn start(dir: &Path, steps: usize) -> (Child, std::path::PathBuf, Instant, String) {
    let root = synthetic_dataset(dir, 4, 16);
    let cfg = write_tiny_job(&dir.join("job.toml"), &root, steps, 0, "");
    let out = dir.join("run");
    let log = dir.join("job.log");
    let started = Instant::now();
    let child = spawn(&["--cpus", "2", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()], dir, &log);
    let address = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(at) = text.find("store ") {
            let rest = &text[at + "store ".len()..];
            break rest[..rest.find(char::is_whitespace).unwrap_or(rest.len())].to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no store address in:\n{text}");
        std::thread::sleep(Duration::from_millis(5));
    };
    (child, log, started, address)
}

/// Sends `bytes` and returns what the store answered before closing (it must close within `within`).
fn probe(address: &str, bytes: &[u8], within: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(within)).unwrap();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => answer,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => answer,
        Err(e) => panic!("the store kept a probe ({bytes:?}) open past {within:?}: {e}"),
    }
}

#[test]
fn probes_without_the_token_get_no_answer_and_the_job_trains_on() {
    let dir = tempfile::tempdir().unwrap();
    let (child, log, started, address) = start(dir.path(), 150);
    // The store closes an unauthenticated connection after its 10 s hello timeout at the latest.
    let within = Duration::from_secs(15);
    for bytes in [
        &b"GET /keys HTTP/1.1\r\nHost: mgrun\r\n\r\n"[..],
        &[0xff; 16][..],
        &[0x00, 0x00, 0x00, 0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16][..],
        &b""[..],
    ] {
        assert!(probe(&address, bytes, within).is_empty(), "the store answered a probe without the token");
    }
    let job = finish(child, started, &log, LIMIT);
    assert!(job.ok(), "{}", job.log);
    assert_eq!(read_jsonl(&dir.path().join("run/steps.jsonl")).unwrap().len(), 150);
    assert_no_leftovers(dir.path());
}

/// The soft limit on open files raised to the hard one; returns the new limit.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

/// 5,000 idle connections (fewer where the hard limit on open files is lower) opened while the job
/// starts and held: start-up and training go on, and the job still stops cleanly on SIGTERM.
#[test]
fn thousands_of_idle_store_connections_do_not_stall_the_job() {
    // This process and the launcher each hold one end of every connection; leave room for the rest.
    let wanted = 5000.min(raise_open_file_limit().saturating_sub(512) as usize);
    assert!(wanted >= 500, "the hard limit on open files allows only {wanted} idle connections");
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log, started, address) = start(dir.path(), 1_000_000);
    // Opened while the launcher starts its ranks and they meet at the store.
    let idle: Vec<TcpStream> = (0..wanted).filter_map(|_| TcpStream::connect(&address).ok()).collect();
    let flood_s = started.elapsed().as_secs_f64();
    assert!(
        child.try_wait().unwrap().is_none(),
        "the job ended during the flood:\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(idle.len(), wanted, "connections to the store were refused");
    // Training goes on with every connection still open.
    let steps = |dir: &Path| read_jsonl(&dir.join("run/steps.jsonl")).map_or(0, |r| r.len());
    let (before, deadline) = (steps(dir.path()), Instant::now() + LIMIT);
    while steps(dir.path()) < before + 20 {
        assert!(Instant::now() < deadline, "training stalled with {wanted} idle connections");
        assert!(child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(&log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{wanted} idle store connections opened in {flood_s:.1} s from the job's start; training went on");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let stopped = Instant::now();
    let job = finish(child, started, &log, LIMIT);
    assert_eq!(job.status.code(), Some(128 + libc::SIGTERM), "{}", job.log);
    assert!(stopped.elapsed() < Duration::from_secs(10), "took {:?} to stop", stopped.elapsed());
    drop(idle);
    assert_no_leftovers(dir.path());
}
