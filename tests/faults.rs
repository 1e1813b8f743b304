//! Fault cases of issue 14 (nothing lost, nothing silently wrong): each reproduces the case and
//! asserts the exit status, the message naming the culprit and that no file is lost.

use mgrun_tests::{read_jsonl, run_mgrun, synthetic_dataset, text, write_tiny_job};
use std::path::Path;

fn run(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = run_mgrun(args, cwd);
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
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
