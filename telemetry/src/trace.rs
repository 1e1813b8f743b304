//! Chrome traces (the JSON array format that chrome://tracing and Perfetto open): one file per rank
//! while the job runs, merged by the launcher into one timeline with a row per rank.
//!
//! A rank's file is written as it goes, one event per line after an opening `[`: the array format
//! allows the closing bracket to be missing, so a rank that dies still leaves a readable trace.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct TraceWriter {
    path: PathBuf,
    out: BufWriter<File>,
    rank: usize,
    /// The first write error, reported once; tracing never stops training.
    failed: bool,
}

impl TraceWriter {
    pub fn create(path: &Path, rank: usize) -> Result<TraceWriter> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = File::create(path).with_context(|| format!("creating the trace file {}", path.display()))?;
        let mut writer = TraceWriter { path: path.to_path_buf(), out: BufWriter::new(file), rank, failed: false };
        writer.write_line("[");
        Ok(writer)
    }

    /// A complete event ("X"): `name` from `start_us` (Unix microseconds) for `duration_us`.
    pub fn complete(&mut self, name: &str, category: &str, start_us: u64, duration_us: u64, args: Value) {
        let mut event = json!({
            "name": name, "cat": category, "ph": "X", "ts": start_us, "dur": duration_us,
            "pid": self.rank, "tid": thread_id(),
        });
        if !args.is_null() {
            event["args"] = args;
        }
        self.write_line(&format!("{event},"));
    }

    pub fn flush(&mut self) {
        if let Err(error) = self.out.flush() {
            self.report(error);
        }
    }

    fn write_line(&mut self, line: &str) {
        if self.failed {
            return;
        }
        if let Err(error) = writeln!(self.out, "{line}") {
            self.report(error);
        }
    }

    fn report(&mut self, error: std::io::Error) {
        if !self.failed {
            eprintln!("trace: writing {} failed ({error}); tracing stops, training goes on", self.path.display());
            self.failed = true;
        }
    }
}

impl Drop for TraceWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// A small, stable number for the calling thread (Chrome's `tid`): 0 for the first thread that
/// records, 1 for the next, ...
fn thread_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static ID: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    ID.with(|id| *id)
}

/// The events of one rank's trace file (a closing bracket may be missing, and the last line may be
/// cut short by a crash: it is dropped).
pub fn read_events(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim().trim_end_matches(',');
        if line.is_empty() || line == "[" || line == "]" {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(event) => events.push(event),
            Err(_) if i + 1 == lines.len() => {} // cut short by a crash
            Err(error) => anyhow::bail!("{}: line {}: not a trace event: {error}", path.display(), i + 1),
        }
    }
    Ok(events)
}

/// The per-rank trace files in `dir` (`rank<N>.json`), by rank.
pub fn rank_files(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        let rank = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("rank"))
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(rank) = rank {
            files.push((rank, path));
        }
    }
    files.sort();
    Ok(files)
}

/// Merges the rank files of `dir` into `out` (Chrome's object format, one process row per rank,
/// time from the earliest event), written under a temporary name and renamed. Returns the number
/// of ranks and events.
pub fn merge(dir: &Path, out: &Path) -> Result<(usize, usize)> {
    let files = rank_files(dir)?;
    let mut events = Vec::new();
    for (rank, path) in &files {
        events.push(json!({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": format!("rank {rank}")}}));
        events.push(json!({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}));
        events.extend(read_events(path)?);
    }
    let count = events.iter().filter(|e| e["ph"] == "X").count();
    let merged = json!({"traceEvents": events, "displayTimeUnit": "ms"});
    let tmp = out.with_extension("json.tmp");
    let text = serde_json::to_vec(&merged).context("serialising the merged trace")?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok((files.len(), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_every_rank_and_survives_a_cut_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        for rank in 0..2 {
            let mut w = TraceWriter::create(&dir.path().join(format!("rank{rank}.json")), rank).expect("create");
            w.complete("step", "step", 100, 50, json!({"step": 0}));
            w.complete("all_reduce", "comm", 110, 20, json!({"bytes": 64}));
        }
        // A rank that died mid-line.
        std::fs::write(dir.path().join("rank2.json"), "[\n{\"name\":\"step\",\"ph\":\"X\",\"ts\":1,\"dur\":2},\n{\"na")
            .expect("write");
        let out = dir.path().join("trace.json");
        let (ranks, count) = merge(dir.path(), &out).expect("merge");
        assert_eq!((ranks, count), (3, 5));
        let merged: Value = serde_json::from_slice(&std::fs::read(&out).expect("read")).expect("json");
        let names: Vec<&Value> =
            merged["traceEvents"].as_array().expect("array").iter().map(|e| &e["args"]["name"]).collect();
        assert!(names.contains(&&json!("rank 1")));
    }

    #[test]
    fn a_damaged_line_in_the_middle_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rank0.json");
        std::fs::write(&path, "[\n{oops},\n{\"name\":\"a\"},\n").expect("write");
        let error = read_events(&path).expect_err("damaged").to_string();
        assert!(error.contains("rank0.json: line 2"), "{error}");
    }
}
