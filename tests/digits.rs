//! The offline digits datasets (`mgrun datagen rotated_digits|colored_digits`, from scikit-learn's
//! digits in the venv): the deal of scans to domains, ColoredMNIST's colour and label statistics, a
//! clean `data inspect`, and a 2-trial sweep of ERM and DSP-Reg held out on one domain, collected.

use mgrun_tests::{python, run_mgrun, text, workspace_root};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn run_ok(args: &[&str], cwd: &Path) -> String {
    let out = run_mgrun(args, cwd);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "mgrun {args:?} failed:\n{all}");
    all
}

fn datagen(kind: &str, dir: &Path) -> PathBuf {
    let out = dir.join(kind);
    let python = python();
    run_ok(&["datagen", kind, "--out", out.to_str().unwrap(), "--python", python.to_str().unwrap()], dir);
    out
}

/// Every image file below `root`: (domain, class, scan index from the file name, path).
fn images(root: &Path) -> Vec<(String, String, usize, PathBuf)> {
    let mut found = Vec::new();
    for domain in std::fs::read_dir(root).unwrap().flatten().filter(|e| e.path().is_dir()) {
        for class in std::fs::read_dir(domain.path()).unwrap().flatten() {
            for image in std::fs::read_dir(class.path()).unwrap().flatten() {
                let path = image.path();
                let scan = path.file_stem().unwrap().to_str().unwrap().parse().unwrap();
                let name = |e: &std::fs::DirEntry| e.file_name().to_string_lossy().into_owned();
                found.push((name(&domain), name(&class), scan, path));
            }
        }
    }
    found
}

fn config(dataset: &str, root: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join(format!("configs/{dataset}.toml"))).unwrap();
    let path = dir.join(format!("{dataset}.toml"));
    let root_line = format!("root = \"{}\"", root.display());
    std::fs::write(&path, text.replace(&format!("root = \"datasets/{dataset}\""), &root_line)).unwrap();
    path
}

#[test]
fn rotated_digits_deals_every_scan_to_one_domain_and_inspects_clean() {
    let dir = tempfile::tempdir().unwrap();
    let root = datagen("rotated_digits", dir.path());
    let found = images(&root);
    assert_eq!(found.len(), mgrun_data::digits::SCANS);
    let scans: BTreeSet<usize> = found.iter().map(|(_, _, scan, _)| *scan).collect();
    assert_eq!(scans.len(), found.len(), "a scan appears in two domains");
    let spec = mgrun_data::registry::spec("rotated_digits").unwrap();
    for domain in spec.domains {
        let count = found.iter().filter(|(d, ..)| d == domain.dir).count();
        assert_eq!(count, domain.images, "{}", domain.dir);
    }
    // The published counts match, so inspect has nothing to warn about.
    let report =
        run_ok(&["data", "inspect", config("rotated_digits", &root, dir.path()).to_str().unwrap()], dir.path());
    assert!(report.contains("ok") && !report.contains("warning"), "{report}");
}

#[test]
fn colored_digits_colour_agrees_with_the_label_90_80_and_10_percent_of_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = datagen("colored_digits", dir.path());
    // The digit behind every scan, from the file the images were made from.
    let source = std::process::Command::new(python())
        .args(["-c", "import sklearn.datasets as d; print(' '.join(map(str, d.load_digits().target)))"])
        .output()
        .unwrap();
    let digits: Vec<u8> = text(&source.stdout).split_whitespace().map(|d| d.parse().unwrap()).collect();
    assert_eq!(digits.len(), mgrun_data::digits::SCANS, "{}", text(&source.stderr));

    let mut agree: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut flipped = 0;
    let found = images(&root);
    for (domain, class, scan, path) in &found {
        let label = usize::from(class == "digit_5_9");
        flipped += usize::from(label != usize::from(digits[*scan] >= 5));
        let rgb = image::open(path).unwrap().into_rgb8();
        let (red, green): (u64, u64) =
            rgb.pixels().fold((0, 0), |(r, g), p| (r + u64::from(p[0]), g + u64::from(p[1])));
        assert!(rgb.pixels().all(|p| p[2] == 0) && (red == 0) != (green == 0), "{}: not one colour", path.display());
        let entry = agree.entry(domain.clone()).or_default();
        entry.0 += usize::from(usize::from(green > 0) == label);
        entry.1 += 1;
    }
    // Binomial counts within 4.5 standard deviations of their expectation: a wrong construction (no
    // noise, a swapped environment) is off by tens of deviations.
    let close = |count: usize, n: usize, p: f64| {
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        (count as f64 - mean).abs() <= 4.5 * sd
    };
    assert!(close(flipped, found.len(), 0.25), "{flipped} of {} labels flipped", found.len());
    for (domain, disagree) in mgrun_data::digits::COLOR_ENVIRONMENTS {
        let (agreeing, n) = agree[domain];
        assert!(close(agreeing, n, 1.0 - disagree), "{domain}: colour agrees with the label {agreeing} of {n}");
    }
}

/// A 2-trial sweep of ERM and DSP-Reg on the rotated digits, held out on the most rotated domain,
/// then collected, DSP-Reg at its default mode.
#[test]
fn a_two_trial_sweep_on_rotated_digits_runs_and_collects() {
    let dir = tempfile::tempdir().unwrap();
    let root = datagen("rotated_digits", dir.path());
    let cfg = config("rotated_digits", &root, dir.path());
    let cfg = cfg.to_str().unwrap();
    let tiny = ["--set", "train.steps=6", "--set", "model.width=8", "--set", "eval.every_steps=3"];
    let sweep = ["sweep", cfg, "--algorithms", "erm,dsp_reg", "--n-hparams", "1", "--n-trials", "2"];
    let rest = ["--test-domains", "rot75", "--cpus", "1", "--out", "sw", "--run"];
    let log = run_ok(&[&sweep[..], &rest, &tiny].concat(), dir.path());
    assert!(log.contains("ran 4, skipped 0 already done, 0 failed"), "{log}");
    let collected = run_ok(&["collect", dir.path().join("sw").to_str().unwrap()], dir.path());
    let averages = collected.split("### Averages").nth(1).unwrap_or_default();
    for algorithm in ["ERM", "DSP"] {
        let row = averages.lines().find(|l| l.contains(algorithm)).unwrap_or_else(|| panic!("{collected}"));
        assert!(row.contains("+/-"), "{algorithm}: {row}");
    }
    // DSP-Reg gates unless told otherwise; an explicit anchor from scratch is run, with a warning.
    let out = dir.path().join("dsp");
    let dsp = ["--cpus", "1", "--out", out.to_str().unwrap(), "--set", "method.name=dsp_reg"];
    let log = run_ok(&[&dsp[..], &tiny, &[cfg]].concat(), dir.path());
    assert!(!log.contains("warning: method.dsp_reg.mode"), "{log}");
    let resolved = std::fs::read_to_string(out.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("mode = \"gate\""), "{resolved}");
    let anchor = ["--overwrite", "--set", "method.dsp_reg.mode=anchor"];
    let log = run_ok(&[&dsp[..], &anchor, &tiny, &[cfg]].concat(), dir.path());
    assert!(log.contains("method.dsp_reg.mode = \"anchor\" without model.pretrained"), "{log}");
}
