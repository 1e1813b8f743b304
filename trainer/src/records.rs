//! Run outputs written by rank 0: `steps.jsonl` (one record per step) and `results.jsonl` (one
//! record per evaluation, with DomainBed's field names).

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record).with_context(|| format!("writing {}", self.path.display()))?;
        self.out.write_all(b"\n").with_context(|| format!("writing {}", self.path.display()))?;
        // Flushed per record so that a crash loses nothing already reported.
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Accuracy of one domain's in/out splits.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainAccuracy {
    pub domain: usize,
    pub name: String,
    pub is_test: bool,
    pub in_acc: f64,
    pub out_acc: f64,
}

/// Running means of the step records between two evaluations (DomainBed averages its
/// checkpoint_vals the same way).
#[derive(Default)]
pub struct WindowMeans {
    sums: Map<String, Value>,
    count: usize,
}

impl WindowMeans {
    pub fn add(&mut self, key: &str, value: f64) {
        let slot = self.sums.entry(key.to_string()).or_insert(json!(0.0));
        *slot = json!(slot.as_f64().unwrap_or(0.0) + value);
    }
    pub fn finish_step(&mut self) {
        self.count += 1;
    }
    /// The means since the last call, then resets.
    pub fn take(&mut self) -> Map<String, Value> {
        let n = self.count.max(1) as f64;
        let out = self.sums.iter().map(|(k, v)| (k.clone(), json!(v.as_f64().unwrap_or(0.0) / n))).collect();
        self.sums.clear();
        self.count = 0;
        out
    }
}

/// The per-domain accuracy table printed at the end of a run.
pub fn accuracy_table(accs: &[DomainAccuracy]) -> String {
    let width = accs.iter().map(|a| a.name.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:<width$}  {:<5}  {:>7}  {:>7}\n", "domain", "role", "in_acc", "out_acc");
    for a in accs {
        let role = if a.is_test { "test" } else { "train" };
        s.push_str(&format!("{:<width$}  {:<5}  {:>7.4}  {:>7.4}\n", a.name, role, a.in_acc, a.out_acc));
    }
    s
}

/// Peak resident memory of this process in GB (VmHWM), for the `mem_gb` field.
pub fn peak_memory_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()).map(|kb| kb / (1024.0 * 1024.0))
            })
        })
        .unwrap_or(0.0)
}
