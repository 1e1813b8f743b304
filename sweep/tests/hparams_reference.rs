//! The registry's random search against `tests/reference/hparams_reference.py` (numpy's
//! RandomState driven as DomainBed drives it; the script's shared entries were checked against
//! DomainBed's own `hparams_registry.py` at 7df6f06 and HEAD). Values must agree bit for bit.

use mgrun_sweep::{hparams, HValue, RegistryVersion};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")).to_path_buf())
}

#[test]
fn random_search_matches_numpy_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hparams.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/hparams_reference.py");
    let status = Command::new(python()).arg(script).arg(&out).status().expect("run the venv python (make venv)");
    assert!(status.success(), "reference script failed");
    let cases: Vec<Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    // Every method is drawn: 2 versions x 3 datasets x 3 trial seeds x 20 hparams seeds each.
    let algorithms: std::collections::BTreeSet<&str> = cases.iter().filter_map(|c| c["algorithm"].as_str()).collect();
    let methods: std::collections::BTreeSet<&str> = mgrun_methods::METHODS.iter().map(|m| m.name).collect();
    assert_eq!(algorithms, methods, "the reference script must draw every registered method");
    assert_eq!(cases.len(), 360 * methods.len());
    let base = toml::Table::new();
    let mut compared = 0;
    for case in &cases {
        let version = case["version"].as_str().unwrap().parse::<RegistryVersion>().unwrap();
        let algorithm = case["algorithm"].as_str().unwrap();
        let dataset = case["dataset"].as_str().unwrap();
        let hp_seed = case["hparams_seed"].as_u64().unwrap();
        let trial = case["trial_seed"].as_u64().unwrap();
        let ours = hparams(version, algorithm, dataset, hp_seed, trial, &base).unwrap();
        let expected = case["hparams"].as_object().unwrap();
        assert_eq!(ours.len(), expected.len(), "{case}");
        for h in &ours {
            let want = &expected[&h.name];
            match h.value {
                HValue::Int(v) => assert_eq!(Some(v), want.as_i64(), "{} in {case}", h.name),
                HValue::Float(v) => {
                    assert_eq!(Some(v.to_bits()), want["bits"].as_u64(), "{} in {case}", h.name)
                }
            }
            compared += 1;
        }
    }
    assert!(compared >= 4 * cases.len(), "{compared}");
}
