//! World-size invariance: in deterministic mode the same job on 1, 2, 3 and 4 CPU ranks gives the
//! same per-step losses and the same final parameters (relative 1e-5) for every method.

use mgrun_tests::*;
use std::path::Path;

const STEPS: usize = 20;

fn config(dir: &Path, data_root: &Path, method: &str, extra: &str) -> std::path::PathBuf {
    let rest = format!("\n[eval]\nevery_steps = 1000\n\n[method]\nname = \"{method}\"\n{extra}");
    write_tiny_job(&dir.join(format!("{method}.toml")), data_root, STEPS, 7, &rest)
}

fn run(dir: &Path, cfg: &Path, world: usize) -> (Vec<f64>, std::collections::BTreeMap<String, Vec<f64>>) {
    let out_dir = dir.join(format!("{}-w{world}", cfg.file_stem().unwrap().to_string_lossy()));
    let out =
        run_mgrun(&["--cpus", &world.to_string(), "--out", out_dir.to_str().unwrap(), cfg.to_str().unwrap()], dir);
    assert!(out.status.success(), "world {world} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    let steps = read_jsonl(&out_dir.join("steps.jsonl")).unwrap();
    assert_eq!(steps.len(), STEPS);
    let losses = steps.iter().map(|r| r["loss"].as_f64().unwrap()).collect();
    (losses, read_tensors(&out_dir.join("model.safetensors")).unwrap())
}

fn check_invariance(method: &str, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = config(dir.path(), &root, method, extra);
    let (ref_losses, ref_params) = run(dir.path(), &cfg, 1);
    assert!(ref_losses.iter().all(|l| l.is_finite()));
    // The parameters must actually move, or equality would prove nothing.
    assert!(ref_losses[0] != ref_losses[STEPS - 1]);
    for world in 2..=4 {
        let (losses, params) = run(dir.path(), &cfg, world);
        for (step, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
            let rel = (a - b).abs() / b.abs().max(1e-12);
            assert!(rel <= 1e-5, "{method}: world {world} step {step}: loss {a} vs {b} (rel {rel:e})");
        }
        assert_eq!(params.keys().collect::<Vec<_>>(), ref_params.keys().collect::<Vec<_>>());
        for (name, values) in &params {
            let rel = rel_diff(values, &ref_params[name]);
            assert!(rel <= 1e-5, "{method}: world {world}: parameter {name} differs (rel {rel:e})");
        }
    }
}

#[test]
fn erm_is_world_size_invariant() {
    check_invariance("erm", "");
}

#[test]
fn dsp_reg_is_world_size_invariant() {
    // Short warm-up so that the penalty is active for most of the 20 steps.
    check_invariance("dsp_reg", "[method.dsp_reg]\nwarmup_frac = 0.1\nramp_frac = 0.1\nlambda = 1.0\n");
}

#[test]
fn sam_global_is_world_size_invariant() {
    check_invariance("sam", "[method.sam]\nrho = 0.05\nperturb = \"global\"\n");
}
