//! Helpers for the workspace-level tests: locating the `mgrun` binary and the reference Python,
//! running jobs, and reading their outputs.

use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The release `mgrun` binary (`make test` builds it before running the tests).
pub fn mgrun_bin() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("release").join("mgrun");
    assert!(bin.exists(), "{} is missing: run `cargo build --release` (make test does)", bin.display());
    bin
}

pub fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// Runs `mgrun` with `args` in `cwd` and returns its output.
pub fn run_mgrun(args: &[&str], cwd: &Path) -> Output {
    Command::new(mgrun_bin()).args(args).current_dir(cwd).output().expect("starting mgrun")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Generates a small synthetic dataset under `dir` and returns its root.
pub fn synthetic_dataset(dir: &Path, images_per_class: usize, image_size: u32) -> PathBuf {
    let root = dir.join("synthetic");
    let out = run_mgrun(
        &[
            "datagen",
            "synthetic",
            "--out",
            root.to_str().expect("utf-8 path"),
            "--images-per-class",
            &images_per_class.to_string(),
            "--image-size",
            &image_size.to_string(),
        ],
        dir,
    );
    assert!(out.status.success(), "datagen failed: {}{}", text(&out.stdout), text(&out.stderr));
    root
}

pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    s.lines().filter(|l| !l.trim().is_empty()).map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Every tensor of a safetensors file as f64 values, by name.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let tensors = tch::Tensor::read_safetensors(path).with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f64> =
                Vec::<f64>::try_from(t.to_kind(tch::Kind::Double).reshape([-1])).map_err(|e| anyhow!("{name}: {e}"))?;
            Ok((name, v))
        })
        .collect()
}

/// Norm-wise relative difference ||a - b|| / max(||b||, 1e-12).
pub fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-12)
}

/// Pids of the direct children of `pid` (from /proc).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The value of `name` in the environment of process `pid`.
pub fn process_env(pid: u32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    raw.split(|&b| b == 0).find_map(|kv| {
        let kv = String::from_utf8_lossy(kv);
        kv.strip_prefix(&format!("{name}=")).map(str::to_string)
    })
}

/// Writes to `path` a deterministic job on a small synthetic dataset at `data_root` (small CNN of
/// width 8, 8 images of 16 px per domain and step, `sketch` held out, one thread per rank,
/// micro-batches of 2 images) running `steps` steps from `seed`; `rest` adds the job's own tables
/// ([eval], [method], [checkpoint]...).
pub fn write_tiny_job(path: &Path, data_root: &Path, steps: usize, seed: u64, rest: &str) -> PathBuf {
    write_tiny_job_on(path, "synthetic", data_root, "sketch", steps, seed, rest)
}

/// [`write_tiny_job`] on any dataset kind, root and held-out domain.
pub fn write_tiny_job_on(
    path: &Path,
    dataset: &str,
    data_root: &Path,
    test_domain: &str,
    steps: usize,
    seed: u64,
    rest: &str,
) -> PathBuf {
    let text = format!(
        r#"
[data]
dataset = "{dataset}"
root = "{root}"
test_domains = ["{test_domain}"]
batch_per_domain = 8
image_size = 16
num_workers = 1

[model]
arch = "small_cnn"
width = 8
dropout = 0.0

[train]
steps = {steps}
lr = 1e-3
seed = {seed}
deterministic = true
micro_batch = 2
threads = 1
progress_every_s = 1000.0
{rest}
"#,
        root = data_root.display(),
    );
    std::fs::write(path, text).expect("writing the job config");
    path.to_path_buf()
}

/// A six-domain tree in the DomainBed layout under `dir` (hold one out for five training domains):
/// the four synthetic styles of seed 0, plus `noisy_b` and `photo_b` from seed 1.
pub fn six_domain_dataset(dir: &Path, images_per_class: usize, image_size: u32) -> PathBuf {
    std::fs::create_dir_all(dir.join("seed0")).expect("creating the seed-0 directory");
    let a = synthetic_dataset(&dir.join("seed0"), images_per_class, image_size);
    let b = run_mgrun(
        &[
            "datagen",
            "synthetic",
            "--out",
            dir.join("seed1").to_str().expect("utf-8 path"),
            "--seed",
            "1",
            "--images-per-class",
            &images_per_class.to_string(),
            "--image-size",
            &image_size.to_string(),
        ],
        dir,
    );
    assert!(b.status.success(), "datagen failed: {}{}", text(&b.stdout), text(&b.stderr));
    let root = dir.join("six");
    std::fs::create_dir_all(&root).expect("creating the six-domain root");
    for domain in ["noisy", "photo", "rotated", "sketch"] {
        std::fs::rename(a.join(domain), root.join(domain)).expect("moving a domain");
    }
    for domain in ["noisy", "photo"] {
        std::fs::rename(dir.join("seed1").join(domain), root.join(format!("{domain}_b"))).expect("moving a domain");
    }
    root
}

/// Every parameter of a model file, by name.
pub type Params = BTreeMap<String, Vec<f64>>;

/// A run's per-step losses (`steps.jsonl`) and final parameters (`model.safetensors`).
pub fn run_outputs(out_dir: &Path) -> (Vec<(u64, f64)>, Params) {
    let steps = read_jsonl(&out_dir.join("steps.jsonl")).expect("reading steps.jsonl");
    let losses = steps
        .iter()
        .map(|r| (r["step"].as_u64().expect("a step number"), r["loss"].as_f64().expect("a loss")))
        .collect();
    (losses, read_tensors(&out_dir.join("model.safetensors")).expect("reading model.safetensors"))
}

/// How many step records a run has written so far.
pub fn steps_recorded(out_dir: &Path) -> usize {
    std::fs::read_to_string(out_dir.join("steps.jsonl")).map(|s| s.lines().count()).unwrap_or(0)
}

/// [`write_tiny_job`] of ERM on a fresh synthetic dataset under `dir` (`dir/job.toml`): evaluation only
/// at the end, a checkpoint every `checkpoint_every` steps (0: none), the last 2 kept.
pub fn tiny_erm_job(dir: &Path, steps: usize, seed: u64, checkpoint_every: usize) -> PathBuf {
    let data = synthetic_dataset(dir, 6, 16);
    let rest = format!(
        "\n[eval]\nevery_steps = 1000\n\n[checkpoint]\nevery_steps = {checkpoint_every}\nkeep_last = 2\n\n\
         [method]\nname = \"erm\"\n"
    );
    write_tiny_job(&dir.join("job.toml"), &data, steps, seed, &rest)
}

/// The tables that [`write_tiny_job`]'s `rest` adds to make a job checkpoint: an evaluation every
/// `eval_every` steps, `method` (`method_tables`: its own tables, such as `[method.dsp_reg]`), and a
/// checkpoint every `checkpoint_every` steps, the last `keep_last` kept (0: all).
pub struct CheckpointedJob<'a> {
    pub eval_every: usize,
    pub method: &'a str,
    pub method_tables: &'a str,
    pub checkpoint_every: usize,
    pub keep_last: usize,
}

impl CheckpointedJob<'_> {
    pub fn tables(&self) -> String {
        let CheckpointedJob { eval_every, method, method_tables, checkpoint_every, keep_last } = self;
        format!(
            "\n[eval]\nevery_steps = {eval_every}\n\n[method]\nname = \"{method}\"\n{method_tables}\n\
             [checkpoint]\nevery_steps = {checkpoint_every}\nkeep_last = {keep_last}\n"
        )
    }
}
