//! Damaged checkpoints: a truncated, flipped or missing file, or a `latest` that names nothing, is named
//! and passed over by `--resume auto` (which falls back to the newest whole checkpoint); a damaged
//! checkpoint named explicitly is refused. Either way the run's other files are kept.

use crate::harness::{assert_no_leftovers, invoke, Files, LIMIT};
use crate::run_dir::{checkpointed_run, CheckpointedRun};

/// The damage done to the run's newest checkpoint (step6) before it is resumed.
fn damage(out: &std::path::Path, how: &str) {
    let step6 = out.join("checkpoints/step6");
    let part = step6.join("part-0.safetensors");
    match how {
        "truncated" => {
            let bytes = std::fs::read(&part).unwrap();
            std::fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
        }
        "flipped" => {
            let mut bytes = std::fs::read(&part).unwrap();
            let middle = bytes.len() - 64;
            bytes[middle] ^= 0x10;
            std::fs::write(&part, bytes).unwrap();
        }
        "missing manifest" => std::fs::remove_file(step6.join(mgrun_checkpoint::MANIFEST_FILE)).unwrap(),
        "missing part" => std::fs::remove_file(&part).unwrap(),
        "latest names nothing" => std::fs::write(out.join("checkpoints/latest"), "step9\n").unwrap(),
        other => panic!("unknown damage {other}"),
    }
}

#[test]
fn resume_auto_passes_over_a_damaged_checkpoint_naming_it() {
    for (how, named) in [
        ("truncated", "part-0.safetensors"),
        ("flipped", "part-0.safetensors"),
        ("missing manifest", "manifest.bin"),
        ("missing part", "part-0.safetensors"),
        ("latest names nothing", "names step9"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let CheckpointedRun { cfg, out, .. } = checkpointed_run(dir.path());
        damage(&out, how);
        let kept = Files::of(&out.join("checkpoints/step4"));
        let args = ["--cpus", "2", "--out", out.to_str().unwrap(), "--resume", "auto", "--set", "train.steps=8"];
        let run = invoke(&[&args[..], &["--extend", &cfg]].concat(), dir.path(), LIMIT);
        assert!(run.ok(), "{how}: {}", run.log);
        if how == "latest names nothing" {
            // Nothing is damaged but the pointer: the newest whole checkpoint is step6.
            run.assert_says(&["skipping", named, "resuming from", "step6 (step 6"]);
        } else {
            run.assert_says(&["skipping invalid checkpoint", named, "resuming from", "step4 (step 4"]);
        }
        kept.assert_kept(&[]);
        assert_no_leftovers(dir.path());
    }
}

#[test]
fn a_damaged_checkpoint_named_explicitly_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { cfg, out, .. } = checkpointed_run(dir.path());
    damage(&out, "truncated");
    let before = Files::of(&out);
    let step6 = out.join("checkpoints/step6");
    let args = ["--cpus", "2", "--out", out.to_str().unwrap(), "--resume", step6.to_str().unwrap()];
    let run = invoke(&[&args[..], &["--set", "train.steps=8", "--extend", &cfg]].concat(), dir.path(), LIMIT);
    run.assert_refused(&["checkpoint.resume", "part-0.safetensors", "torn or truncated"], 60.0);
    before.assert_kept(&["logs/", "config.resolved.toml", ".mgrun.lock"]);
    assert_no_leftovers(dir.path());
}
