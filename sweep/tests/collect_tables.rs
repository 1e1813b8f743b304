//! `mgrun collect`'s tables on a generated results tree, against hand-computed values.
//!
//! The tree: dataset ColoredMNIST (3 environments, so DomainBed's own collect_results can read it
//! too), ERM with 2 trials x 2 hparams seeds x all single and pair test sets, evaluated at steps 0
//! and 5; plus DSPReg with one single-test run only (its other cells must be "X"). Accuracies:
//! in[i] = IN[hp][step] + 0.1 * trial + 0.01 * i, out[i] = OUT[hp][step] + 0.05 * trial + 0.001 * i,
//! and pair runs report out = 0.99 everywhere (a selection that wrongly used them would change).

use mgrun_sweep::{load_records, render_latex, render_markdown, tables, Selection};
use serde_json::json;
use std::path::Path;

const IN: [[f64; 2]; 2] = [[0.40, 0.80], [0.85, 0.55]];
const OUT: [[f64; 2]; 2] = [[0.80, 0.70], [0.60, 0.75]];

fn write_run(root: &Path, algorithm: &str, trial: i64, hp: usize, test_envs: &[usize]) {
    let envs: Vec<String> = test_envs.iter().map(|e| e.to_string()).collect();
    let dir = root.join(format!("{algorithm}-test{}-hp{hp}-trial{trial}", envs.join("_")));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines = String::new();
    for (s, step) in [0, 5].into_iter().enumerate() {
        let mut record = json!({
            "step": step,
            "args": {"dataset": "ColoredMNIST", "algorithm": algorithm, "test_envs": test_envs,
                     "hparams_seed": hp, "trial_seed": trial, "domains": ["red", "green", "blue"]},
            "hparams": {"lr": 5e-5},
        });
        for i in 0..3 {
            let out = if test_envs.len() == 2 { 0.99 } else { OUT[hp][s] + 0.05 * trial as f64 + 0.001 * i as f64 };
            record[format!("env{i}_in_acc")] = json!(IN[hp][s] + 0.1 * trial as f64 + 0.01 * i as f64);
            record[format!("env{i}_out_acc")] = json!(out);
        }
        lines += &format!("{record}\n");
    }
    std::fs::write(dir.join("results.jsonl"), lines).unwrap();
}

fn make_tree(root: &Path) {
    for trial in 0..2 {
        for hp in 0..2 {
            for test_envs in [vec![0], vec![0, 1], vec![0, 2], vec![1], vec![1, 2], vec![2]] {
                write_run(root, "ERM", trial, hp, &test_envs);
            }
        }
    }
    write_run(root, "DSPReg", 0, 0, &[0]);
    std::fs::write(root.join("sweep.json"), "{}").unwrap();
}

/// (mean, err) of every cell of a row, None for "X".
fn row(t: &mgrun_sweep::collect::Table, algorithm: &str) -> (Vec<Option<(f64, f64)>>, Option<f64>) {
    let r = t.rows.iter().find(|r| r.algorithm == algorithm).unwrap();
    (r.cells.iter().map(|c| c.map(|c| (c.mean, c.err))).collect(), r.avg)
}

fn assert_row(actual: (Vec<Option<(f64, f64)>>, Option<f64>), means: &[Option<f64>], err: f64, avg: Option<f64>) {
    assert_eq!(actual.0.len(), means.len(), "{actual:?}");
    for (cell, want) in actual.0.iter().zip(means) {
        match (cell, want) {
            (Some((m, e)), Some(w)) => {
                assert!((m - w).abs() < 1e-9, "{actual:?} vs {means:?}");
                assert!((e - err).abs() < 1e-9, "{actual:?}: err {e} vs {err}");
            }
            (None, None) => {}
            _ => panic!("{actual:?} vs {means:?}"),
        }
    }
    match (actual.1, avg) {
        (Some(a), Some(w)) => assert!((a - w).abs() < 1e-9, "avg {a} vs {w}"),
        (None, None) => {}
        (a, w) => panic!("avg {a:?} vs {w:?}"),
    }
}

#[test]
fn tables_match_hand_computed_values() {
    let dir = tempfile::tempdir().unwrap();
    make_tree(dir.path());
    let records = load_records(dir.path()).unwrap();
    assert_eq!(records.len(), (2 * 2 * 6 + 1) * 2);
    // Two trials a + 0.1 apart: np.std = 0.05, / sqrt(2) = 0.0353553 -> 3.5355 in percent.
    let se2 = 100.0 * 0.05 / 2f64.sqrt();

    // Training-domain validation: hp0 at step 0 has the best mean training out-accuracy (0.80 +
    // 0.05 t + ...), beating hp1's best (step 5, 0.75): test = IN[0][0] + 0.1 t + 0.01 i.
    let iid = tables(&records, Selection::TrainingDomain);
    assert_eq!(iid.datasets.len(), 1);
    let t = &iid.datasets[0];
    assert_eq!(t.columns, ["red", "green", "blue"]);
    assert_eq!(t.rows.iter().map(|r| r.algorithm.as_str()).collect::<Vec<_>>(), ["ERM", "DSPReg"]);
    assert_row(row(t, "ERM"), &[Some(45.0), Some(46.0), Some(47.0)], se2, Some(46.0));
    // DSPReg: one trial of test env 0 (standard error 0), the rest missing.
    assert_row(row(t, "DSPReg"), &[Some(40.0), None, None], 0.0, None);
    assert_row(row(&iid.averages, "ERM"), &[Some(46.0)], se2, Some(46.0));
    // DSPReg's trial 0 averages over the test envs it has: just env 0.
    assert_row(row(&iid.averages, "DSPReg"), &[Some(40.0)], 0.0, Some(40.0));

    // Oracle: last step only; hp1's test-env out accuracy 0.75 beats hp0's 0.70.
    let oracle = tables(&records, Selection::Oracle);
    assert_row(row(&oracle.datasets[0], "ERM"), &[Some(60.0), Some(61.0), Some(62.0)], se2, Some(61.0));

    // Leave-one-domain-out: per step, the mean in-accuracy of the other envs from the pair runs;
    // hp1 at step 0 (0.85 + ...) wins: test = IN[1][0] + 0.1 t + 0.01 i. DSPReg has no pairs.
    let loo = tables(&records, Selection::LeaveOneOut);
    assert_row(row(&loo.datasets[0], "ERM"), &[Some(90.0), Some(91.0), Some(92.0)], se2, Some(91.0));
    assert_row(row(&loo.datasets[0], "DSPReg"), &[None, None, None], 0.0, None);
    assert_row(row(&loo.averages, "DSPReg"), &[None], 0.0, None);

    let all: Vec<_> = Selection::ALL.iter().map(|&s| tables(&records, s)).collect();
    let md = render_markdown(records.len(), &all);
    assert!(md.contains("## Model selection: training-domain validation set"), "{md}");
    assert!(md.contains("| ERM | 45.0 +/- 3.5 | 46.0 +/- 3.5 | 47.0 +/- 3.5 | 46.0 |"), "{md}");
    assert!(md.contains("| DSPReg | 40.0 +/- 0.0 | X | X | X |"), "{md}");
    assert!(md.contains("| ERM | 90.0 +/- 3.5 | 91.0 +/- 3.5 | 92.0 +/- 3.5 | 91.0 |"), "{md}");
    let tex = render_latex(records.len(), &all);
    assert!(tex.contains("ERM & 60.0 $\\pm$ 3.5 & 61.0 $\\pm$ 3.5 & 62.0 $\\pm$ 3.5 & 61.0 \\\\"), "{tex}");
    assert!(tex.contains("\\subsubsection{Averages}") && tex.trim_end().ends_with("\\end{document}"), "{tex}");

    if let Some(keep) = std::env::var_os("MGRUN_KEEP_COLLECT_TREE") {
        // For comparing with DomainBed's own collect_results by hand.
        let status = std::process::Command::new("cp").arg("-r").arg(dir.path()).arg(keep).status().unwrap();
        assert!(status.success());
    }
}

#[test]
fn malformed_records_are_named_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("results.jsonl"), "{\"step\": 0, \"args\": {\"dataset\": \"x\"}}\n").unwrap();
    let err = format!("{:#}", load_records(dir.path()).unwrap_err());
    assert!(err.contains("results.jsonl:1") && err.contains("args.test_envs"), "{err}");
}
