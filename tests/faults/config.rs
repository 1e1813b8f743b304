//! Bad configs and options: each is refused by the launcher, before any rank starts (no `logs/` in the
//! run directory), with exit code 1 and a message naming the file or the `--set`, and the key.

use crate::harness::{assert_no_leftovers, invoke, Invocation, LIMIT};
use mgrun_tests::{synthetic_dataset, write_tiny_job};

/// Runs a 2-rank job of `body` (written to `job.toml`) with `extra` options in a fresh directory.
fn launch(body: &str, extra: &[&str]) -> (tempfile::TempDir, Invocation) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("job.toml");
    std::fs::write(&cfg, body).unwrap();
    let out = dir.path().join("run");
    let args = [&["--cpus", "2", "--out", out.to_str().unwrap()][..], extra, &[cfg.to_str().unwrap()]].concat();
    let invocation = invoke(&args, dir.path(), LIMIT);
    (dir, invocation)
}

/// The case is refused within 20 s, naming `needles`, and no rank was started.
fn refused_before_spawning(body: &str, extra: &[&str], needles: &[&str]) {
    let (dir, invocation) = launch(body, extra);
    invocation.assert_refused(needles, 20.0);
    assert!(!dir.path().join("run/logs").exists(), "ranks were started:\n{}", invocation.log);
    assert_no_leftovers(dir.path());
}

#[test]
fn unknown_and_mistyped_keys_are_named_with_the_file() {
    refused_before_spawning("[data]\nroot = \"x\"\n[train]\nstepps = 3\n", &[], &["stepps", "job.toml"]);
    refused_before_spawning("[data]\nroot = \"x\"\n[train]\nsteps = \"ten\"\n", &[], &["train.steps", "job.toml"]);
}

/// A TOML syntax error gives the file's line and column; a directory given as the config says so.
#[test]
fn syntax_errors_give_line_and_column_and_a_directory_is_not_a_config() {
    refused_before_spawning("[data]\nroot = \"x\"\n[train]\nsteps = = 3\n", &[], &["job.toml:4:"]);
    let dir = tempfile::tempdir().unwrap();
    let invocation = invoke(&["--cpus", "1", dir.path().to_str().unwrap()], dir.path(), LIMIT);
    invocation.assert_refused(&["is a directory"], 20.0);
}

/// Values that used to pass or be changed silently.
#[test]
fn out_of_range_values_are_refused_by_key() {
    for (set, key) in [
        ("train.lr=inf", "train.lr"),
        ("eval.batch_size=0", "eval.batch_size"),
        ("data.root=\"\"", "data.root"),
        ("model.arch=\"resnet34\"", "model.arch"),
        ("data.image_size=0", "data.image_size"),
        ("data.holdout_fraction=1.5", "data.holdout_fraction"),
        ("comm.timeout_s=-1", "comm.timeout_s"),
    ] {
        refused_before_spawning("[data]\nroot = \"x\"\n", &["--set", set], &[key]);
    }
}

/// An error that a `--set` brings in is blamed on that `--set`, not on the config file.
#[test]
fn set_errors_are_blamed_on_the_set_not_on_the_file() {
    let (_dir, invocation) = launch("[data]\nroot = \"x\"\n", &["--set", "train.steps=5", "--set", "train.lr=inf"]);
    invocation.assert_refused(&["--set train.lr=inf: key `train.lr`"], 20.0);
    assert!(!invocation.log.contains("job.toml"), "blamed on the file:\n{}", invocation.log);
    let (_dir, invocation) = launch("[data]\nroot = \"x\"\n", &["--set", "train.stepz=5"]);
    invocation.assert_refused(&["--set train.stepz=5", "stepz"], 20.0);
}

/// Test-domain names are checked against the tree's domain directories before any rank starts; indices
/// work as the README says.
#[test]
fn unknown_test_domains_fail_before_spawning_and_indices_work() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 4, 16);
    let body = std::fs::read_to_string(write_tiny_job(&dir.path().join("job.toml"), &root, 2, 0, "")).unwrap();
    refused_before_spawning(
        &body,
        &["--set", "data.test_domains=[\"sketchy\"]"],
        &["sketchy", "not a domain", "photo"],
    );
    refused_before_spawning(&body, &["--set", "data.test_domains=[9]"], &["'9' is not a domain"]);
    let (_dir, invocation) = launch(&body, &["--set", "data.test_domains=[1]"]);
    assert!(invocation.ok(), "{}", invocation.log);
}

/// BatchNorm in training mode across ranks, a DomainBed dataset without its weights, an impossible
/// batch, a missing dataset: refused before spawning, each with the key and what to do.
#[test]
fn settings_that_cannot_work_are_refused_with_what_to_do() {
    let freeze = "[data]\nroot = \"x\"\n[model]\narch = \"resnet18\"\nfreeze_bn = false\n";
    refused_before_spawning(freeze, &[], &["model.freeze_bn", "2 ranks", "freeze_bn = true"]);
    let pacs = "[data]\ndataset = \"pacs\"\nroot = \"x\"\n[model]\narch = \"resnet50\"\n";
    refused_before_spawning(pacs, &[], &["model.pretrained", "make weights", "\"none\""]);
    // With "none" the check passes: the run gets as far as the (missing) dataset.
    let none = "[data]\ndataset = \"pacs\"\nroot = \"/nonexistent/mgrun-pacs\"\n[model]\narch = \"resnet50\"\n\
                pretrained = \"none\"\n";
    refused_before_spawning(none, &[], &["/nonexistent/mgrun-pacs"]);
    let batch = "[data]\nroot = \"x\"\nbatch_per_domain = 1000000000\n";
    refused_before_spawning(batch, &[], &["data.batch_per_domain", "GB", "job.toml"]);
    let missing = "[data]\ndataset = \"folder\"\nroot = \"/nonexistent/mgrun-data\"\n";
    refused_before_spawning(missing, &[], &["/nonexistent/mgrun-data"]);
}

/// A sweep that would expand to an absurd number of runs is refused at once (it was OOM-killed after
/// 80 s), naming the options, and writes nothing.
#[test]
fn an_absurd_sweep_is_refused_before_it_is_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let sweep = ["sweep", cfg.to_str().unwrap(), "--algorithms", "erm", "--n-hparams", "1000000000"];
    let invocation = invoke(&[&sweep[..], &["--n-trials", "1000000", "--out", "sw"]].concat(), dir.path(), LIMIT);
    invocation.assert_refused(&["--n-hparams", "--max-runs"], 20.0);
    assert!(!dir.path().join("sw").exists(), "the refused sweep wrote its directory");
}

/// An unwritable checkpoint directory fails before the job starts (it failed at the first checkpoint),
/// naming the key and the path.
#[test]
fn an_unwritable_checkpoint_directory_fails_before_spawning() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let body = std::fs::read_to_string(write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "")).unwrap();
    // A file where the directory should be: not writable as a directory, whoever runs the test.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"a file").unwrap();
    let set = format!("checkpoint.dir={}", blocked.join("checkpoints").display());
    refused_before_spawning(&body, &["--set", &set], &["checkpoint.dir", "blocked"]);
}
