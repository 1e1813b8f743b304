//! A failing rank takes the job down quickly and by name; bad input fails with a message naming it.

use mgrun_tests::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn long_job(root: &Path) -> String {
    format!(
        r#"
[data]
dataset = "synthetic"
root = "{}"
batch_per_domain = 4
image_size = 16

[model]
arch = "small_cnn"
width = 8

[train]
steps = 1000000
lr = 1e-3

[eval]
every_steps = 1000000
"#,
        root.display()
    )
}

#[test]
fn sigkill_of_one_rank_stops_the_job_within_10s_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 4, 16);
    let cfg = write_config(dir.path(), &long_job(&root));
    let out_dir = dir.path().join("run");
    let mut child = Command::new(mgrun_bin())
        .args(["--cpus", "3", "--out", out_dir.to_str().unwrap(), cfg.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training is under way (steps are being recorded).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let steps = read_jsonl(&out_dir.join("steps.jsonl")).map(|r| r.len()).unwrap_or(0);
        if steps >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "training did not start");
        assert!(child.try_wait().unwrap().is_none(), "mgrun exited early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = child_pids(child.id())
        .into_iter()
        .find(|&p| process_env(p, "RANK").as_deref() == Some("1"))
        .expect("rank 1 process");
    let killed_at = Instant::now();
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(15), "mgrun still running 15 s after the kill");
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = killed_at.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(stderr.contains("rank 1"), "{stderr}");
    assert!(stderr.contains("SIGKILL") || stderr.contains("signal 9"), "{stderr}");
}

fn expect_failure(body: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), body);
    let started = Instant::now();
    let out = run_mgrun(
        &["--cpus", "2", "--out", dir.path().join("run").to_str().unwrap(), cfg.to_str().unwrap()],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(60));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    for n in needles {
        assert!(all.contains(n), "expected {n:?} in:\n{all}");
    }
}

#[test]
fn unknown_config_key_is_named() {
    expect_failure("[data]\nroot = \"x\"\n[train]\nstepps = 3\n", &["stepps", "job.toml"]);
}

#[test]
fn wrong_config_type_is_named() {
    expect_failure("[data]\nroot = \"x\"\n[train]\nsteps = \"ten\"\n", &["train.steps", "job.toml"]);
}

/// BatchNorm's batch statistics are not synchronised across ranks: refused before training.
#[test]
fn batch_norm_in_training_mode_on_several_ranks_is_refused() {
    expect_failure(
        "[data]\nroot = \"x\"\n[model]\narch = \"resnet18\"\nfreeze_bn = false\n",
        &["model.freeze_bn", "2 ranks", "freeze_bn = true"],
    );
}

/// A DomainBed benchmark without its ImageNet weights stops before spawning, with the command that
/// makes them; `model.pretrained = "none"` is the explicit way to train from scratch.
#[test]
fn domainbed_dataset_without_pretrained_weights_stops_with_the_instruction() {
    expect_failure(
        "[data]\ndataset = \"pacs\"\nroot = \"x\"\n[model]\narch = \"resnet50\"\n",
        &["model.pretrained", "make weights", "\"none\""],
    );
    // With "none" the check passes: the run gets as far as the (missing) dataset.
    expect_failure(
        "[data]\ndataset = \"pacs\"\nroot = \"/nonexistent/mgrun-pacs\"\n[model]\narch = \"resnet50\"\npretrained = \"none\"\n",
        &["/nonexistent/mgrun-pacs"],
    );
}

/// Config values that only the ranks used to check fail in the launcher, before any rank starts.
#[test]
fn architecture_and_image_size_errors_fail_before_spawning() {
    for (body, key) in [
        ("[data]\nroot = \"x\"\n[model]\narch = \"resnet34\"\n", "model.arch"),
        ("[data]\nroot = \"x\"\nimage_size = 0\n", "data.image_size"),
        ("[data]\nroot = \"x\"\nholdout_fraction = 1.5\n", "data.holdout_fraction"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), body);
        let out = dir.path().join("run");
        let result = run_mgrun(&["--cpus", "2", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()], dir.path());
        let all = format!("{}{}", text(&result.stdout), text(&result.stderr));
        assert!(!result.status.success() && all.contains(key) && all.contains("job.toml"), "{key}: {all}");
        assert!(!out.join("logs").exists(), "{key}: ranks were started:\n{all}");
    }
}

/// A batch that cannot fit in memory is refused before any rank starts, naming the key.
#[test]
fn an_impossible_batch_size_is_refused_before_spawning() {
    expect_failure(
        "[data]\nroot = \"x\"\nbatch_per_domain = 1000000000\n",
        &["data.batch_per_domain", "GB", "job.toml"],
    );
}

#[test]
fn missing_dataset_directory_is_named() {
    expect_failure(
        "[data]\ndataset = \"folder\"\nroot = \"/nonexistent/mgrun-data\"\n[model]\narch = \"small_cnn\"\n",
        &["/nonexistent/mgrun-data"],
    );
}
