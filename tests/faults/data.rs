//! Broken dataset trees: nothing is dropped without a trace, and a tree that `mgrun data inspect`
//! rejects is not trained on silently.

use crate::harness::{assert_no_leftovers, invoke, LIMIT};
use mgrun_tests::{read_jsonl, synthetic_dataset, write_tiny_job};

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
    let run = invoke(&args, dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    let name = victim.file_name().unwrap().to_str().unwrap();
    run.assert_says(&["left out 1 unreadable image(s)", name]);
    let listed = std::fs::read_to_string(out.join("skipped.txt")).unwrap();
    assert_eq!(listed.lines().count(), 1);
    assert!(listed.contains(name), "{listed}");
    let records = read_jsonl(&out.join("results.jsonl")).unwrap();
    let args = &records.last().unwrap()["args"];
    assert_eq!(args["skipped_images"], 1, "{args}");
    assert!(args["skipped_first"][0].as_str().unwrap().contains(name), "{args}");
}

/// Training refuses a tree that `data inspect` rejects (a class missing in one domain), unless
/// data.allow_missing_classes says to go on, with a warning.
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
    let refused = invoke(&args, dir.path(), LIMIT);
    refused.assert_refused(&["'photo' lacks class", &class_name, "data.allow_missing_classes"], 60.0);
    assert_no_leftovers(dir.path());
    let allowed = ["--set", "data.allow_missing_classes=true", "--overwrite"];
    let run = invoke(&[&allowed[..], &args].concat(), dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["warning: data.allow_missing_classes = true"]);
}

/// A directory symlink cycle is an error naming the link (it multiplied the images and put the same
/// files in the train and held-out splits), and a dangling image link is an unreadable image under
/// data.on_corrupt (it vanished silently).
#[test]
fn symlink_cycles_are_refused_and_dangling_image_links_are_unreadable_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let class = std::fs::read_dir(root.join("photo")).unwrap().flatten().next().unwrap().path();
    std::os::unix::fs::symlink(&class, class.join("loop")).unwrap();
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let out = dir.path().join("run");
    let args = ["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()];
    invoke(&args, dir.path(), LIMIT).assert_refused(&["loop", "symlink cycle"], 60.0);
    invoke(&["data", "inspect", cfg.to_str().unwrap()], dir.path(), LIMIT).assert_refused(&["symlink cycle"], 60.0);
    assert_no_leftovers(dir.path());

    std::fs::remove_file(class.join("loop")).unwrap();
    std::os::unix::fs::symlink(class.join("missing.jpg"), class.join("dangling.jpg")).unwrap();
    let skip = ["--cpus", "1", "--out", out.to_str().unwrap(), "--set", "data.on_corrupt=skip", cfg.to_str().unwrap()];
    let run = invoke(&skip, dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["left out 1 unreadable image(s)", "dangling.jpg"]);
}
