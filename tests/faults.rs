//! Fault cases of issue 14 (nothing lost, nothing silently wrong): each reproduces the case and
//! asserts the exit status, the message naming the culprit and that no file is lost.

use mgrun_tests::{read_jsonl, run_mgrun, synthetic_dataset, text, write_tiny_job};
use std::path::{Path, PathBuf};

fn run(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = run_mgrun(args, cwd);
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

/// A finished 6-step run with a checkpoint every 2 steps (all kept): the dataset root, the config
/// and the run directory.
struct CheckpointedRun {
    root: PathBuf,
    cfg: String,
    out: PathBuf,
}

fn checkpointed_run(dir: &Path) -> CheckpointedRun {
    let root = synthetic_dataset(dir, 6, 16);
    let checkpoints = "\n[checkpoint]\nevery_steps = 2\nkeep_last = 0\n";
    let cfg = write_tiny_job(&dir.join("job.toml"), &root, 6, 0, checkpoints).to_str().unwrap().to_string();
    let out = dir.join("run");
    let (ok, log) = run(&["--cpus", "1", "--out", out.to_str().unwrap(), &cfg], dir);
    assert!(ok, "{log}");
    CheckpointedRun { root, cfg, out }
}

/// `data.on_corrupt = "skip"` names what it left out: the count and the first paths on the console and
/// in results.jsonl's args, every path in `<out>/skipped.txt`.
#[test]
fn skipped_images_are_reported_on_the_console_in_the_records_and_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    // One unreadable image in a training domain.
    let class_dir = std::fs::read_dir(root.join("photo")).unwrap().flatten().next().unwrap().path();
    let victim = std::fs::read_dir(&class_dir).unwrap().flatten().next().unwrap().path();
    std::fs::write(&victim, b"not a jpeg").unwrap();
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let out = dir.path().join("run");
    let args = ["--cpus", "1", "--out", out.to_str().unwrap(), "--set", "data.on_corrupt=skip", cfg.to_str().unwrap()];
    let (ok, log) = run(&args, dir.path());
    assert!(ok, "{log}");
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(log.contains("left out 1 unreadable image(s)") && log.contains(name), "{log}");
    let listed = std::fs::read_to_string(out.join("skipped.txt")).unwrap();
    assert_eq!(listed.lines().count(), 1);
    assert!(listed.contains(name), "{listed}");
    let records = read_jsonl(&out.join("results.jsonl")).unwrap();
    let args = &records.last().unwrap()["args"];
    assert_eq!(args["skipped_images"], 1, "{args}");
    assert!(args["skipped_first"][0].as_str().unwrap().contains(name), "{args}");
}

/// Issue 14 item 1: `--resume auto` resumes this run's checkpoint (the one `latest` names), never
/// another run's; a changed identity is refused by key; train.steps changes only with --extend; a
/// finished run is not "resumed" into a 0-step success that overwrites its model.
#[test]
fn resume_follows_latest_and_refuses_another_runs_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { root, cfg, out } = checkpointed_run(dir.path());
    let (cfg, out_arg) = (cfg.as_str(), out.to_str().unwrap());
    let model = std::fs::read(out.join("model.safetensors")).unwrap();

    // A finished run: nothing to train, an error, and the model is untouched.
    let (ok, log) = run(&["--cpus", "1", "--out", out_arg, "--resume", "auto", cfg], dir.path());
    assert!(!ok && log.contains("nothing left to train") && log.contains("--extend"), "{log}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), model, "the finished run's model changed");

    // Another run's checkpoint (more steps) lands in this run's checkpoint root, past `latest`.
    let other = dir.path().join("other");
    let more = ["--set", "train.steps=10"];
    let (ok, log) = run(&[&["--cpus", "1", "--out", other.to_str().unwrap()][..], &more, &[cfg]].concat(), dir.path());
    assert!(ok, "{log}");
    copy_dir(&other.join("checkpoints/step10"), &out.join("checkpoints/step10"));

    // More steps without --extend: refused, naming the key and the flag.
    let resume = ["--cpus", "1", "--out", out_arg, "--resume", "auto"];
    let (ok, log) = run(&[&resume[..], &more, &[cfg]].concat(), dir.path());
    assert!(!ok && log.contains("train.steps: 6 -> 10") && log.contains("--extend"), "{log}");

    // Another dataset root: refused by key.
    let moved = dir.path().join("moved");
    copy_dir(&root, &moved);
    let root_set = format!("data.root={}", moved.display());
    let (ok, log) = run(&[&resume[..], &["--set", &root_set, cfg]].concat(), dir.path());
    assert!(!ok && log.contains("data.root"), "{log}");

    // With --extend this run continues from its own step6 (latest), not the other run's step10.
    let (ok, log) = run(&[&resume[..], &more, &["--extend", cfg]].concat(), dir.path());
    assert!(ok, "{log}");
    assert!(
        log.contains("newer than latest") && log.contains("not this run's") && log.contains("step6 (step 6"),
        "{log}"
    );
    assert!(log.contains("--extend: train.steps: 6 -> 10"), "{log}");
    let steps = read_jsonl(&out.join("steps.jsonl")).unwrap();
    assert_eq!(steps.len(), 10, "the extended run records steps 0-9");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A run stopped between committing a checkpoint directory and moving `latest` resumes from that
/// newest commit: it has the run's config fingerprint.
#[test]
fn a_commit_newer_than_latest_from_the_same_run_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { cfg, out, .. } = checkpointed_run(dir.path());
    let cfg = cfg.as_str();
    std::fs::write(out.join("checkpoints/latest"), "step4\n").unwrap();
    let args =
        ["--cpus", "1", "--out", out.to_str().unwrap(), "--resume", "auto", "--set", "train.steps=8", "--extend"];
    let (ok, log) = run(&[&args[..], &[cfg]].concat(), dir.path());
    assert!(ok, "{log}");
    assert!(log.contains("step6 (step 6") && !log.contains("skipping"), "{log}");
}

/// Issue 14 item 2: a run directory holds one run. Re-running into a finished run is refused (its
/// files untouched) unless --overwrite replaces it, and a second job on a running job's --out fails at
/// once, naming the first, without touching its files.
#[test]
fn a_run_directory_is_locked_and_a_finished_run_is_not_overwritten_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let (cfg, out) = (cfg.to_str().unwrap(), dir.path().join("run"));
    let out_arg = out.to_str().unwrap();
    let (ok, log) = run(&["--cpus", "1", "--out", out_arg, cfg], dir.path());
    assert!(ok, "{log}");
    let results = std::fs::read(out.join("results.jsonl")).unwrap();

    let (ok, log) = run(&["--cpus", "1", "--out", out_arg, "--set", "train.seed=1", cfg], dir.path());
    assert!(!ok && log.contains("a finished run") && log.contains("--overwrite") && log.contains("--resume"), "{log}");
    assert_eq!(std::fs::read(out.join("results.jsonl")).unwrap(), results, "the refused job touched the results");

    let (ok, log) = run(&["--cpus", "1", "--out", out_arg, "--overwrite", "--set", "train.seed=1", cfg], dir.path());
    assert!(ok && log.contains("--overwrite: removed"), "{log}");
    assert_ne!(std::fs::read(out.join("results.jsonl")).unwrap(), results, "--overwrite kept the old results");

    // A long job holds the directory; a second one fails fast and names it.
    let long = dir.path().join("long");
    let first = std::process::Command::new(mgrun_tests::mgrun_bin())
        .args(["--cpus", "1", "--out", long.to_str().unwrap(), "--set", "train.steps=400", cfg])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = long.join(".mgrun.lock");
    let waited = std::time::Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |t| t.is_empty()) {
        assert!(waited.elapsed().as_secs() < 30, "the first job never took its lock");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let started = std::time::Instant::now();
    let (ok, log) = run(&["--cpus", "1", "--out", long.to_str().unwrap(), "--resume", "auto", cfg], dir.path());
    assert!(
        !ok && log.contains("another mgrun job is running there") && log.contains(&format!("pid {}", first.id())),
        "{log}"
    );
    assert!(started.elapsed().as_secs() < 10, "the second job took {:?} to fail", started.elapsed());
    let mut first = first;
    assert!(first.wait().unwrap().success(), "the first job failed");
    assert_eq!(read_jsonl(&long.join("steps.jsonl")).unwrap().len(), 400, "the first job's records are incomplete");
}

/// Issue 14 item 4: a sweep that would expand to an absurd number of runs is refused at once (it was
/// OOM-killed after 80 s), naming the options.
#[test]
fn an_absurd_sweep_is_refused_before_it_is_expanded() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let started = std::time::Instant::now();
    let sweep = ["sweep", cfg.to_str().unwrap(), "--algorithms", "erm", "--n-hparams", "1000000000"];
    let (ok, log) = run(&[&sweep[..], &["--n-trials", "1000000", "--out", "sw"]].concat(), dir.path());
    assert!(!ok && log.contains("--n-hparams") && log.contains("--max-runs"), "{log}");
    assert!(started.elapsed().as_secs() < 20, "took {:?}", started.elapsed());
    assert!(!dir.path().join("sw").exists(), "the refused sweep wrote its directory");
}

/// Issue 14 item 8: an unwritable checkpoint directory fails before the job starts (it failed at the
/// first checkpoint), naming the key and the path.
#[test]
fn an_unwritable_checkpoint_directory_fails_before_spawning() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    // A file where the directory should be: not writable as a directory, whoever runs the test.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"a file").unwrap();
    let set = format!("checkpoint.dir={}", blocked.join("checkpoints").display());
    let out = dir.path().join("run");
    let (ok, log) =
        run(&["--cpus", "1", "--out", out.to_str().unwrap(), "--set", &set, cfg.to_str().unwrap()], dir.path());
    assert!(!ok && log.contains("checkpoint.dir") && log.contains("blocked"), "{log}");
    assert!(!out.join("logs").exists(), "ranks were started");
}

/// Issue 14 item 6: training refuses a tree that `data inspect` rejects (a class missing in one
/// domain), unless data.allow_missing_classes says to go on, with a warning.
#[test]
fn training_refuses_a_tree_with_a_class_missing_in_one_domain() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let class = std::fs::read_dir(root.join("photo")).unwrap().flatten().next().unwrap().path();
    let class_name = class.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::remove_dir_all(&class).unwrap();
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let out = dir.path().join("run");
    let args = ["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()];
    let (ok, log) = run(&args, dir.path());
    assert!(!ok && log.contains("'photo' lacks class") && log.contains(&class_name), "{log}");
    assert!(log.contains("data.allow_missing_classes"), "{log}");
    let (ok, log) =
        run(&[&["--set", "data.allow_missing_classes=true", "--overwrite"][..], &args].concat(), dir.path());
    assert!(ok && log.contains("warning: data.allow_missing_classes = true"), "{log}");
}

/// Issue 14 item 9: a dataset whose classes changed since the checkpoint says so on resume (it said
/// only "parameter buffer has [94086] elements, got [94021]").
#[test]
fn a_changed_class_count_on_resume_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { root, cfg, out } = checkpointed_run(dir.path());
    let cfg = cfg.as_str();
    // As if stopped after step 4; then a class appears in every domain.
    std::fs::remove_dir_all(out.join("checkpoints/step6")).unwrap();
    std::fs::write(out.join("checkpoints/latest"), "step4\n").unwrap();
    for domain in std::fs::read_dir(&root).unwrap().flatten().filter(|e| e.path().is_dir()) {
        let class = std::fs::read_dir(domain.path()).unwrap().flatten().next().unwrap().path();
        copy_dir(&class, &domain.path().join("zz_new_class"));
    }
    let (ok, log) = run(&["--cpus", "1", "--out", out.to_str().unwrap(), "--resume", "auto", cfg], dir.path());
    assert!(!ok && log.contains("classes changed") && log.contains("parameters"), "{log}");
}

/// Issue 14 item 5: a directory symlink cycle is an error naming the link (it multiplied the images
/// and put the same files in the train and held-out splits), and a dangling image link is an
/// unreadable image under data.on_corrupt (it vanished silently).
#[test]
fn symlink_cycles_are_refused_and_dangling_image_links_are_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let class = std::fs::read_dir(root.join("photo")).unwrap().flatten().next().unwrap().path();
    std::os::unix::fs::symlink(&class, class.join("loop")).unwrap();
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let out = dir.path().join("run");
    let args = ["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()];
    let (ok, log) = run(&args, dir.path());
    assert!(!ok && log.contains("loop") && log.contains("symlink cycle"), "{log}");
    let (ok, log) = run(&["data", "inspect", cfg.to_str().unwrap()], dir.path());
    assert!(!ok && log.contains("symlink cycle"), "data inspect: {log}");

    std::fs::remove_file(class.join("loop")).unwrap();
    std::os::unix::fs::symlink(class.join("missing.jpg"), class.join("dangling.jpg")).unwrap();
    let skip = ["--cpus", "1", "--out", out.to_str().unwrap(), "--set", "data.on_corrupt=skip", cfg.to_str().unwrap()];
    let (ok, log) = run(&skip, dir.path());
    assert!(ok && log.contains("left out 1 unreadable image(s)") && log.contains("dangling.jpg"), "{log}");
}
