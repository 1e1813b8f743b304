//! Every DomainBed dataset name end to end on a small generated tree in its layout (real JPEG/PNG files):
//! `mgrun datagen layout`, `mgrun data inspect` (with `--splits`), then a 50-step CPU run of the shipped
//! config with a small CNN at 16 px.

use mgrun_tests::{read_jsonl, run_mgrun, text, workspace_root};
use std::path::Path;

/// (config file, data.dataset, held-out domain of the config, extra overrides)
const CASES: &[(&str, &str, &str, &[&str])] = &[
    ("pacs.toml", "pacs", "art_painting", &[]),
    ("vlcs.toml", "vlcs", "Caltech101", &[]),
    ("office_home.toml", "office_home", "Art", &[]),
    ("terra_incognita.toml", "terra_incognita", "location_100", &[]),
    ("domainnet.toml", "domain_net", "clipart", &["--set", "data.split=official"]),
];

fn run_ok(args: &[&str], cwd: &Path) -> String {
    let out = run_mgrun(args, cwd);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "mgrun {args:?} failed:\n{all}");
    all
}

#[test]
fn inspect_and_a_50_step_run_for_every_dataset() {
    for &(config_file, dataset, test_domain, extra) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(dataset);
        let root_arg = root.to_str().unwrap();
        run_ok(
            &[
                "datagen",
                "layout",
                dataset,
                "--out",
                root_arg,
                "--classes",
                "3",
                "--images-per-class",
                "6",
                "--image-size",
                "20",
            ],
            dir.path(),
        );
        let config = workspace_root().join("configs").join(config_file);
        let config_arg = config.to_str().unwrap();
        let root_set = format!("data.root={root_arg}");

        let splits = dir.path().join("splits.json");
        let mut inspect = vec![
            "data",
            "inspect",
            config_arg,
            "--set",
            &root_set,
            "--splits",
            splits.to_str().unwrap(),
            "--trial-seed",
            "2",
        ];
        inspect.extend_from_slice(extra);
        let report = run_ok(&inspect, dir.path());
        assert!(report.contains("\nok\n") && report.contains("published"), "{dataset}: {report}");
        let splits: serde_json::Value = serde_json::from_slice(&std::fs::read(&splits).unwrap()).unwrap();
        let held_out = &splits[test_domain];
        let n = |key: &str| held_out[key].as_array().unwrap().len();
        assert_eq!(n("in") + n("out"), 18, "{dataset}: {held_out}");
        let first = held_out["in"][0].as_str().unwrap();
        assert!(first.starts_with(&format!("{test_domain}/")) && root.join(first).is_file(), "{dataset}: {first}");

        let out_dir = dir.path().join("run");
        let mut train = vec![
            "--cpus",
            "1",
            "--out",
            out_dir.to_str().unwrap(),
            "--set",
            &root_set,
            "--set",
            "train.steps=50",
            "--set",
            "model.arch=small_cnn",
            "--set",
            "data.image_size=16",
            "--set",
            "data.batch_per_domain=8",
            "--set",
            "model.width=8",
        ];
        train.extend_from_slice(extra);
        train.push(config_arg);
        run_ok(&train, dir.path());
        let records = read_jsonl(&out_dir.join("results.jsonl")).unwrap();
        let last = records.last().unwrap_or_else(|| panic!("{dataset}: no results"));
        // DomainBed numbers steps from 0: the last of 50 is step 49.
        assert_eq!(last["step"].as_u64(), Some(49), "{dataset}: {last}");
    }
}
