//! World-size invariance, bit for bit: in deterministic mode the same job on any number of CPU ranks
//! gives identical per-step losses and identical final parameters, for erm, dsp_reg, global and
//! local (per-domain) sam, on the uneven plans as well: 3 training domains on 1, 2, 4 and 5 ranks,
//! and 5 training domains on 1, 2, 3 and 8 ranks (pieces of two domains on one rank, domains split
//! over ranks, ranks with different numbers of micro-batches). A checkpoint written on 5 ranks and
//! resumed on 2 continues exactly as the uninterrupted run.
//!
//! Equality holds on any machine because every micro-batch is computed by the same kernels with the
//! same thread count whatever rank runs it, and the gradients are summed in one fixed order.

use mgrun_tests::*;
use std::path::{Path, PathBuf};

const STEPS: usize = 12;

struct Job {
    dataset: &'static str,
    root: PathBuf,
    test_domain: &'static str,
}

fn config(dir: &Path, job: &Job, method: &str, extra: &str, rest: &str) -> PathBuf {
    let rest = format!("\n[eval]\nevery_steps = 1000\n{rest}\n[method]\nname = \"{method}\"\n{extra}");
    let name = format!("{}-{method}-{}.toml", job.dataset, extra.len());
    write_tiny_job_on(&dir.join(name), job.dataset, &job.root, job.test_domain, STEPS, 7, &rest)
}

fn run(dir: &Path, cfg: &Path, world: usize, extra_args: &[&str]) -> (PathBuf, String) {
    let stem = cfg.file_stem().unwrap().to_string_lossy();
    let out_dir = dir.join(format!("{stem}-w{world}-{}", extra_args.len()));
    let mut args = vec!["--cpus".to_string(), world.to_string(), "--out".into(), out_dir.display().to_string()];
    args.extend(extra_args.iter().map(|a| a.to_string()));
    args.push(cfg.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_mgrun(&args, dir);
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "world {world} failed:\n{log}");
    (out_dir, log)
}

/// Every world size's losses and parameters are exactly the one-rank run's.
fn check_invariance(job: &Job, worlds: &[usize], method: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), job, method, extra, "");
    let (reference, _) = run(dir.path(), &cfg, 1, &[]);
    let (ref_losses, ref_params) = run_outputs(&reference);
    assert_eq!(ref_losses.len(), STEPS);
    assert!(ref_losses.iter().all(|(_, l)| l.is_finite()));
    // The parameters must actually move, or equality would prove nothing.
    assert!(ref_losses[0].1 != ref_losses[STEPS - 1].1, "{method}: the loss did not change");
    for &world in worlds {
        let (out_dir, log) = run(dir.path(), &cfg, world, &[]);
        assert!(log.contains("sharding plan") && log.contains("micro-batches of 2"), "{log}");
        let (losses, params) = run_outputs(&out_dir);
        assert_eq!(losses, ref_losses, "{method}: {world} ranks: per-step losses differ from 1 rank");
        assert_eq!(params.keys().collect::<Vec<_>>(), ref_params.keys().collect::<Vec<_>>());
        for (name, values) in &params {
            assert!(values == &ref_params[name], "{method}: {world} ranks: parameter {name} differs from 1 rank");
        }
    }
}

fn three_domains(dir: &Path) -> Job {
    Job { dataset: "synthetic", root: synthetic_dataset(dir, 6, 16), test_domain: "sketch" }
}

fn five_domains(dir: &Path) -> Job {
    Job { dataset: "folder", root: six_domain_dataset(dir, 4, 16), test_domain: "rotated" }
}

const DSP_REG: &str = "[method.dsp_reg]\nmode = \"anchor\"\nwarmup_frac = 0.1\nramp_frac = 0.1\nlambda = 1.0\n";
const SAM_GLOBAL: &str = "[method.sam]\nrho = 0.05\nperturb = \"global\"\n";
const SAM_LOCAL: &str = "[method.sam]\nrho = 0.05\nperturb = \"local\"\n";

#[test]
fn three_domains_on_1_2_4_5_ranks() {
    let data = tempfile::tempdir().unwrap();
    let job = three_domains(data.path());
    for (method, extra) in [("erm", ""), ("dsp_reg", DSP_REG), ("sam", SAM_GLOBAL), ("sam", SAM_LOCAL)] {
        check_invariance(&job, &[2, 4, 5], method, extra);
    }
}

#[test]
fn five_domains_on_1_2_3_8_ranks() {
    let data = tempfile::tempdir().unwrap();
    let job = five_domains(data.path());
    for (method, extra) in [("erm", ""), ("dsp_reg", DSP_REG), ("sam", SAM_GLOBAL), ("sam", SAM_LOCAL)] {
        check_invariance(&job, &[2, 3, 8], method, extra);
    }
}

/// The penalty methods switch their penalty on (and restart Adam) in mid-run.
const VREX: &str = "[method.vrex]\nlambda = 10.0\npenalty_anneal_iters = 3\n";
const GROUP_DRO: &str = "[method.group_dro]\neta = 0.5\n";
const CORAL: &str = "[method.coral]\ngamma = 1.0\n";
const FISHR: &str = "[method.fishr]\nlambda = 100.0\npenalty_anneal_iters = 3\nema = 0.9\n";
const DISAM: &str = "[method.disam]\nrho = 0.05\nlambda = 5.0\n";
const TRAM_NOISE: &str = "[method.tram]\ntarget = \"noise\"\nlogit_scale = 100.0\n";
const UDIM: &str = "[method.udim]\nwarmup_frac = 0.25\n";
/// The loader's images: partners cross ranks as 8-bit pixels.
const MIXUP: &str = "[method.mixup]\nalpha = 0.5\ntransport = \"uint8\"\n";

/// The cross-domain objectives, DISAM, TRAM-x (its noise follows the micro-batch), UDIM and Mixup
/// (partner images as 8-bit pixels): 2 ranks split a
/// domain, 3 hold one each, 4 split two (uneven pieces).
#[test]
fn dg_methods_on_1_2_3_4_ranks() {
    let data = tempfile::tempdir().unwrap();
    let job = three_domains(data.path());
    let methods = [
        ("vrex", VREX),
        ("group_dro", GROUP_DRO),
        ("coral", CORAL),
        ("fishr", FISHR),
        ("disam", DISAM),
        ("tram", TRAM_NOISE),
        ("udim", UDIM),
        ("mixup", MIXUP),
    ];
    for (method, extra) in methods {
        check_invariance(&job, &[2, 3, 4], method, extra);
    }
}

/// Fishr's EMAs and GroupDRO's weights travel in the checkpoint: resumed on another number of ranks
/// after the penalty switched on, the run continues as if uninterrupted.
#[test]
fn stateful_methods_resume_exactly_on_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let job = three_domains(dir.path());
    let checkpoints = "\n[checkpoint]\nevery_steps = 4\nkeep_last = 0\n";
    for (method, extra) in [("fishr", FISHR), ("group_dro", GROUP_DRO)] {
        let cfg = config(dir.path(), &job, method, extra, checkpoints);
        let (uninterrupted, _) = run(dir.path(), &cfg, 1, &[]);
        let (ref_losses, ref_params) = run_outputs(&uninterrupted);
        let (three, _) = run(dir.path(), &cfg, 3, &[]);
        let checkpoint = three.join("checkpoints").join("step4");
        let (resumed, log) = run(dir.path(), &cfg, 2, &["--resume", checkpoint.to_str().unwrap()]);
        assert!(log.contains("resuming from") && log.contains("written on 3 rank(s)"), "{log}");
        let (losses, params) = run_outputs(&resumed);
        let expected: Vec<(u64, f64)> = ref_losses.iter().filter(|(s, _)| *s >= 4).copied().collect();
        assert_eq!(losses, expected, "{method} resumed on 2 ranks: losses differ from the uninterrupted run");
        assert!(params == ref_params, "{method} resumed on 2 ranks: parameters differ from the uninterrupted run");
    }
}

/// A checkpoint written on 5 ranks, resumed on 2, equals the uninterrupted run, with dropout on:
/// its draws follow the micro-batch, not the rank.
#[test]
fn resume_from_5_ranks_on_2_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let job = three_domains(dir.path());
    let checkpoints = "\n[checkpoint]\nevery_steps = 4\nkeep_last = 0\n";
    let cfg = config(dir.path(), &job, "dsp_reg", DSP_REG, checkpoints);
    let dropout = ["--set", "model.dropout=0.3"];
    let (uninterrupted, _) = run(dir.path(), &cfg, 1, &dropout);
    let (ref_losses, ref_params) = run_outputs(&uninterrupted);
    let (no_dropout, _) = run(dir.path(), &cfg, 1, &[]);
    assert!(run_outputs(&no_dropout).0 != ref_losses, "dropout must change the run, or this proves nothing");

    let (five, _) = run(dir.path(), &cfg, 5, &dropout);
    assert_eq!(run_outputs(&five).0, ref_losses, "5 ranks differ from 1");
    let checkpoint = five.join("checkpoints").join("step4");
    let checkpoint = checkpoint.to_str().unwrap();
    let (resumed, log) = run(dir.path(), &cfg, 2, &[&dropout[..], &["--resume", checkpoint]].concat());
    assert!(log.contains("resuming from") && log.contains("written on 5 rank(s)"), "{log}");
    let (losses, params) = run_outputs(&resumed);
    let expected: Vec<(u64, f64)> = ref_losses.iter().filter(|(s, _)| *s >= 4).copied().collect();
    assert_eq!(losses, expected, "resumed on 2 ranks: losses differ from the uninterrupted run");
    assert!(params == ref_params, "resumed on 2 ranks: parameters differ from the uninterrupted run");
}

/// The fast path (not deterministic) runs the uneven plans too: domain groups of split domains for
/// the per-domain methods, several pieces per rank. (Its numbers agree with one rank's to float
/// rounding; methods/tests/sharding.rs checks that against the summation error bound.)
#[test]
fn fast_path_runs_uneven_plans() {
    let dir = tempfile::tempdir().unwrap();
    let job = three_domains(dir.path());
    for (method, extra) in [("dsp_reg", DSP_REG), ("sam", SAM_LOCAL)] {
        let cfg = config(dir.path(), &job, method, extra, "");
        let fast = ["--set", "train.deterministic=false"];
        for world in [2, 4] {
            let (out_dir, log) = run(dir.path(), &cfg, world, &fast);
            assert!(log.contains("split domains") && log.contains("groups of the"), "{method}, {world} ranks:\n{log}");
            assert!(!log.contains("micro-batches"), "{log}");
            let (losses, _) = run_outputs(&out_dir);
            assert_eq!(losses.len(), STEPS);
            assert!(losses.iter().all(|(_, l)| l.is_finite()), "{method}, {world} ranks: {losses:?}");
        }
    }
    // The cross-domain objectives need no domain groups: only their statistics cross ranks.
    for (method, extra) in [("coral", CORAL), ("fishr", FISHR)] {
        let cfg = config(dir.path(), &job, method, extra, "");
        let (out_dir, log) = run(dir.path(), &cfg, 2, &["--set", "train.deterministic=false"]);
        assert!(log.contains("communication per step: per-domain"), "{method}:\n{log}");
        let (losses, _) = run_outputs(&out_dir);
        assert_eq!(losses.len(), STEPS);
        assert!(losses.iter().all(|(_, l)| l.is_finite()), "{method}, 2 ranks: {losses:?}");
    }
}
