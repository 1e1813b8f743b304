//! DomainBed's in/out split bit for bit: against numpy for many sizes, trial seeds and environments, and
//! against DomainBed's `split_dataset` over torchvision's `ImageFolder` on a small tree (the venv's Python).

mod common;

use common::{config, write_png};
use mgrun_data::inspect::write_splits;
use mgrun_data::{split_in_out, DataConfig, Dataset};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")).to_path_buf())
}

fn reference(args: &[&str], out: &Path) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/domainbed_split.py");
    let status = Command::new(python()).arg(script).args(args).status().expect("run the venv python (make venv)");
    assert!(status.success(), "reference script failed: {args:?}");
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

fn indices(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn matches_numpy_for_many_sizes_trials_and_environments() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sizes.json");
    // Real domain sizes (PACS, TerraIncognita, VLCS) among small and awkward ones.
    let sizes = [0usize, 1, 2, 3, 4, 5, 7, 9, 10, 16, 31, 64, 100, 255, 257, 1000, 1415, 1670, 2048, 4879, 9767];
    let sizes_arg = sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",");
    let (trials, envs) = (4usize, 6usize);
    let expected = reference(&["sizes", out.to_str().unwrap(), &sizes_arg, "4", "6", "0.2"], &out);
    let mut compared = 0;
    for &n in &sizes {
        for trial in 0..trials {
            for env in 0..envs {
                let want = &expected[format!("{n}/{trial}/{env}")];
                let (ins, outs) = split_in_out(n, 0.2, trial as u64, env);
                assert_eq!(outs, indices(&want["out"]), "out split, n={n} trial={trial} env={env}");
                assert_eq!(ins, indices(&want["in"]), "in split, n={n} trial={trial} env={env}");
                compared += 1;
            }
        }
    }
    assert_eq!(compared, sizes.len() * trials * envs);
}

/// A tree whose file order exercises ImageFolder's sorting: numbers as text, upper case before lower case,
/// nested directories, a space in a domain name, mixed extensions.
fn awkward_tree(root: &Path) {
    let names = ["img10.jpg", "img2.png", "Img3.jpg", "a b.png", "z.JPG", "img1.jpeg"];
    for (d, domain) in ["Real World", "Art", "clip"].iter().enumerate() {
        for (c, class) in ["Dog", "cat", "bird_2", "bird_10"].iter().enumerate() {
            for (i, name) in names.iter().enumerate().take(3 + (d + c) % 4) {
                write_png(&root.join(domain).join(class).join(name), 4, (d * 40 + c * 7 + i) as u8);
            }
            write_png(&root.join(domain).join(class).join("sub/deeper.png"), 4, 9);
            write_png(&root.join(domain).join(class).join("sub_a/x.png"), 4, 10);
        }
    }
}

#[test]
fn matches_domainbed_split_dataset_over_imagefolder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    awkward_tree(&root);
    let theirs_path = dir.path().join("domainbed.json");
    let theirs =
        reference(&["tree", root.to_str().unwrap(), "0,1,2", "0.2", theirs_path.to_str().unwrap()], &theirs_path);
    for trial_seed in [0u64, 1, 2] {
        let cfg = DataConfig { dataset: "folder".into(), split_seed: trial_seed, ..config(&root, 8) };
        let ds = Dataset::open(&cfg).unwrap();
        let ours_path = dir.path().join(format!("ours_{trial_seed}.json"));
        write_splits(&ds, &ours_path).unwrap();
        let ours: Value = serde_json::from_slice(&std::fs::read(&ours_path).unwrap()).unwrap();
        assert_eq!(ours, theirs[trial_seed.to_string()], "trial seed {trial_seed}");
        // The JSON lists the domains in environment order.
        let text = std::fs::read_to_string(&ours_path).unwrap();
        let positions: Vec<usize> =
            ["\"Art\"", "\"Real World\"", "\"clip\""].iter().map(|k| text.find(k).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "environment order in {text}");
    }
}
