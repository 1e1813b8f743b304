//! Resume in deterministic mode: a run checkpointed on W ranks and resumed on W' ranks (4->2,
//! 2->3, 1->4) gives exactly the per-step losses and final parameters of the uninterrupted run;
//! `--resume auto` into the same output directory continues steps.jsonl; a changed config is
//! refused naming the key. Dropout draws follow the micro-batch, not the rank, so a run with
//! dropout resumed on another number of ranks is exact too.

use mgrun_tests::*;
use std::path::{Path, PathBuf};

const STEPS: usize = 12;

fn config(dir: &Path, data_root: &Path) -> PathBuf {
    let job = CheckpointedJob {
        eval_every: 5,
        method: "dsp_reg",
        method_tables: "\n[method.dsp_reg]\nmode = \"anchor\"\n",
        checkpoint_every: 3,
        keep_last: 0,
    };
    write_tiny_job(&dir.join("job.toml"), data_root, STEPS, 7, &job.tables())
}

fn mgrun_ok(args: &[&str], dir: &Path) -> String {
    let out = run_mgrun(args, dir);
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "mgrun {args:?} failed:\n{log}");
    log
}

fn assert_matches(what: &str, losses: &[(u64, f64)], params: &Params, ref_losses: &[(u64, f64)], ref_params: &Params) {
    for (step, loss) in losses {
        let (_, reference) = ref_losses[*step as usize];
        assert_eq!(*loss, reference, "{what}: step {step} loss");
    }
    for (name, reference) in ref_params {
        assert!(
            &params[name] == reference,
            "{what}: parameter {name} differs (by {:e})",
            rel_diff(&params[name], reference)
        );
    }
}

#[test]
fn resume_on_another_number_of_ranks_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 4, 16);
    let cfg = config(dir.path(), &root);
    let cfg_s = cfg.to_str().unwrap();
    let reference = dir.path().join("reference");
    mgrun_ok(&["--cpus", "1", "--out", reference.to_str().unwrap(), cfg_s], dir.path());
    let (ref_losses, ref_params) = run_outputs(&reference);
    assert_eq!(ref_losses.len(), STEPS);
    assert!(ref_losses[0].1 != ref_losses[STEPS - 1].1, "the parameters must move");

    for (before, after, at) in [(4, 2, 6), (2, 3, 3), (1, 4, 9)] {
        let first = dir.path().join(format!("w{before}"));
        mgrun_ok(&["--cpus", &before.to_string(), "--out", first.to_str().unwrap(), cfg_s], dir.path());
        let checkpoint = first.join("checkpoints").join(format!("step{at}"));
        let second = dir.path().join(format!("w{before}-to-w{after}"));
        let log = mgrun_ok(
            &[
                "--cpus",
                &after.to_string(),
                "--out",
                second.to_str().unwrap(),
                "--resume",
                checkpoint.to_str().unwrap(),
                cfg_s,
            ],
            dir.path(),
        );
        assert!(log.contains(&format!("resuming from {}", checkpoint.display())), "{log}");
        let (losses, params) = run_outputs(&second);
        let steps: Vec<u64> = losses.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, (at..STEPS as u64).collect::<Vec<_>>());
        assert_matches(&format!("{before}->{after} ranks at step {at}"), &losses, &params, &ref_losses, &ref_params);
    }

    // --resume auto in the same output directory: the newest checkpoint (step 12 = the end) is
    // rolled back to step 6 by deleting the newer ones; steps.jsonl continues from there.
    let run = dir.path().join("w2");
    for step in [9, 12] {
        std::fs::remove_dir_all(run.join("checkpoints").join(format!("step{step}"))).unwrap();
    }
    // Not there in the checkpoint dir listing: a torn write is only a .tmp directory.
    std::fs::create_dir_all(run.join("checkpoints").join(".tmp-step9")).unwrap();
    let log = mgrun_ok(&["--cpus", "3", "--out", run.to_str().unwrap(), "--resume", "auto", cfg_s], dir.path());
    assert!(log.contains("resuming from") && log.contains("step6"), "{log}");
    let (losses, params) = run_outputs(&run);
    let steps: Vec<u64> = losses.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, (0..STEPS as u64).collect::<Vec<_>>(), "steps.jsonl must continue without duplicates");
    assert_matches("auto resume 2->3", &losses, &params, &ref_losses, &ref_params);
    let evaluations: Vec<u64> =
        read_jsonl(&run.join("results.jsonl")).unwrap().iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(evaluations, vec![0, 5, 10, 11]);

    // Dropout draws from torch's generator, re-seeded for every micro-batch from (seed, step, pass,
    // micro-batch): a resume on another number of ranks reproduces the run that did not stop.
    let dropout = ["--set", "model.dropout=0.3"];
    let full = dir.path().join("dropout-full");
    mgrun_ok(&[&["--cpus", "2", "--out", full.to_str().unwrap()][..], &dropout, &[cfg_s]].concat(), dir.path());
    let (full_losses, full_params) = run_outputs(&full);
    assert!(
        full_losses.iter().zip(&ref_losses).any(|(a, b)| (a.1 - b.1).abs() > 1e-4),
        "dropout must change the run, or this proves nothing"
    );
    let resumed = dir.path().join("dropout-resumed");
    let checkpoint = full.join("checkpoints").join("step3");
    mgrun_ok(
        &[
            &["--cpus", "3", "--out", resumed.to_str().unwrap(), "--resume", checkpoint.to_str().unwrap()][..],
            &dropout,
            &[cfg_s],
        ]
        .concat(),
        dir.path(),
    );
    let (losses, params) = run_outputs(&resumed);
    assert_matches("dropout, 2->3 ranks at step 3", &losses, &params, &full_losses, &full_params);

    // A different learning rate is refused, naming the key.
    let out =
        run_mgrun(&["--out", run.to_str().unwrap(), "--resume", "auto", "--set", "train.lr=0.5", cfg_s], dir.path());
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success() && log.contains("train.lr"), "{log}");
}
