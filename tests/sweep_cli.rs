//! `mgrun sweep --run` end to end on a tiny synthetic tree: every run finishes with a `done` marker,
//! results.jsonl carries the sweep's DomainBed args and drawn hyperparameters, a second `--run`
//! skips everything, the Slurm script is valid bash and skips done runs, and `mgrun collect` reads
//! the tree.

use mgrun_tests::{run_mgrun, synthetic_dataset, text};
use std::path::Path;

const CONFIG: &str = r#"
[data]
dataset = "synthetic"
root = "synthetic"
test_domains = ["photo"]
batch_per_domain = 8
image_size = 16
num_workers = 1

[model]
arch = "small_cnn"
width = 8

[train]
steps = 2
lr = 2e-3
threads = 1
progress_every_s = 100.0

[eval]
every_steps = 1
batch_size = 256
"#;

fn sweep(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["sweep", "tiny.toml", "--algorithms", "erm", "--n-hparams-from", "1", "--n-hparams", "2"];
    args.extend(["--n-trials", "1", "--out", "sw"]);
    args.extend(extra);
    let out = run_mgrun(&args, dir);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "mgrun sweep failed:\n{all}");
    all
}

#[test]
fn sweep_runs_records_and_collects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    synthetic_dataset(dir, 4, 16);
    std::fs::write(dir.join("tiny.toml"), CONFIG).unwrap();

    let first = sweep(dir, &["--run"]);
    assert!(first.contains("ran 4, skipped 0 already done, 0 failed"), "{first}");
    let sweep_dir = dir.join("sw");
    for test_env in 0..4 {
        let run = sweep_dir.join(format!("erm-test{test_env}-hp01-trial0"));
        assert!(run.join("done").is_file(), "{} has no done marker", run.display());
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
        let records = mgrun_tests::read_jsonl(&run.join("results.jsonl")).unwrap();
        assert_eq!(records.len(), 2, "evaluations at step 0 and the last step");
        let last = records.last().unwrap();
        for key in ["dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed", "seed"] {
            assert_eq!(last["args"][key], manifest["args"][key], "args.{key} in {}", run.display());
        }
        assert_eq!(last["args"]["test_envs"], serde_json::json!([test_env]));
        for key in ["lr", "batch_size", "resnet_dropout", "weight_decay"] {
            assert_eq!(last["hparams"][key], manifest["hparams"][key], "hparams.{key} in {}", run.display());
        }
        assert!(last["env3_in_acc"].is_number() && last["env3_out_acc"].is_number(), "{last}");
    }

    let second = sweep(dir, &["--run"]);
    assert!(second.contains("ran 0, skipped 4 already done"), "{second}");

    let script = dir.join("sweep.sbatch");
    let third = sweep(dir, &["--slurm", script.to_str().unwrap()]);
    assert!(third.contains("4 done"), "{third}");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --array=0-3"), "{body}");
    let task = std::process::Command::new("bash").arg(&script).env("SLURM_ARRAY_TASK_ID", "2").output().unwrap();
    assert!(task.status.success(), "{}", text(&task.stderr));
    assert!(text(&task.stdout).contains("erm-test2-hp01-trial0 is done"), "{}", text(&task.stdout));

    let collected = run_mgrun(&["collect", "sw"], dir);
    let table = text(&collected.stdout);
    assert!(collected.status.success(), "{table}{}", text(&collected.stderr));
    assert!(table.contains("### Dataset: synthetic") && table.contains("| ERM |"), "{table}");
    assert!(sweep_dir.join("results.md").is_file());
}
