//! nprand against the venv's numpy: raw MT19937 words, random_sample, uniform, randint (32- and 64-bit
//! ranges, negative bounds), choice, permutation, shuffle of `list(range(n))` for many sizes and seeds
//! (DomainBed's seeds among them), and DomainBed's md5 seed hash. Floats are compared by their bits.

use mgrun_nprand::{seed_hash, PyArg, RandomState};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")).to_path_buf())
}

/// The reference streams, computed once per test binary (the tests run in parallel).
fn numpy_reference() -> &'static Value {
    static REFERENCE: OnceLock<Value> = OnceLock::new();
    REFERENCE.get_or_init(compute_numpy_reference)
}

fn compute_numpy_reference() -> Value {
    let dir = std::env::temp_dir().join(format!("nprand-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("streams.json");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/numpy_streams.py");
    let status = Command::new(python()).arg(script).arg(&out).status().expect("run the venv python (make venv)");
    assert!(status.success(), "numpy reference script failed");
    let json = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    json
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn streams_match_numpy_bit_for_bit() {
    let reference = numpy_reference();
    let sizes = u64s(&reference["shuffle_sizes"]);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() > 20);
    for case in cases {
        let seed = case["seed"].as_u64().unwrap() as u32;
        let mut rs = RandomState::new(seed);
        let words: Vec<u64> = (0..8).map(|_| u64::from(rs.next_u32())).collect();
        assert_eq!(words, u64s(&case["u32"]), "raw words, seed {seed}");

        let mut rs = RandomState::new(seed);
        for expected in u64s(&case["random_sample"]) {
            assert_eq!(rs.random_sample().to_bits(), expected, "random_sample, seed {seed}");
        }
        for expected in u64s(&case["uniform"]) {
            assert_eq!(rs.uniform(-5.0, -3.5).to_bits(), expected, "uniform, seed {seed}");
        }
        for entry in case["randint"].as_array().unwrap() {
            let (low, high) = (entry[0].as_i64().unwrap(), entry[1].as_i64().unwrap());
            for expected in entry[2].as_array().unwrap() {
                assert_eq!(
                    rs.randint(low, high).unwrap(),
                    expected.as_i64().unwrap(),
                    "randint({low}, {high}), seed {seed}"
                );
            }
        }
        let options = [0, 1, 5, 10, 20];
        for expected in u64s(&case["choice"]) {
            assert_eq!(*rs.choice(&options).unwrap() as u64, expected, "choice, seed {seed}");
        }
        let permutation: Vec<u64> = rs.permutation(37).into_iter().map(|v| v as u64).collect();
        assert_eq!(permutation, u64s(&case["permutation"]), "permutation, seed {seed}");
        assert_eq!(
            rs.random_sample().to_bits(),
            case["after"].as_u64().unwrap(),
            "stream position after the calls, seed {seed}"
        );

        for (n, expected) in sizes.iter().zip(case["shuffle"].as_array().unwrap()) {
            let mut keys: Vec<u64> = (0..*n).collect();
            RandomState::new(seed).shuffle(&mut keys);
            assert_eq!(keys, u64s(expected), "shuffle(list(range({n}))), seed {seed}");
        }
    }
}

#[test]
fn seed_hash_matches_python_md5_of_the_tuple_text() {
    let reference = numpy_reference();
    for entry in reference["seed_hashes"].as_array().unwrap() {
        let args: Vec<PyArg> = entry[0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| match v {
                Value::Number(n) => PyArg::Int(n.as_i64().unwrap()),
                Value::String(s) => PyArg::Str(s.clone()),
                Value::Object(o) => {
                    PyArg::IntList(o["list"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
                }
                other => panic!("unexpected {other}"),
            })
            .collect();
        assert_eq!(u64::from(seed_hash(&args)), entry[1].as_u64().unwrap(), "seed_hash{args:?}");
    }
}
