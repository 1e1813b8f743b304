//! `mgrun bench step` on the CPU with tiny sizes: every (method, precision) row, ratios to ERM,
//! the bf16 autocast check, JSON output; fp16 is refused with a clear message.
use std::process::Command;

#[test]
fn bench_step_runs_on_cpu_and_prints_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("step.json");
    let out = Command::new(env!("CARGO_BIN_EXE_mgrun"))
        .args(["bench", "step", "--cpus", "1", "--arch", "small_cnn", "--width", "8", "--image-size", "16"])
        .args(["--batch-per-domain", "4", "--classes", "3", "--steps", "2", "--warmup", "1", "--phases"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("bf16 autocast active on Cpu"), "{stdout}");
    for method in ["erm", "dsp_reg", "sam"] {
        for precision in ["fp32", "bf16"] {
            assert!(stdout.contains(&format!("| {method} | {precision} | false |")), "{method} {precision}:\n{stdout}");
        }
    }
    assert!(stdout.contains("ERM fp32 phases"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| r["ms_per_step"].as_f64().unwrap() > 0.0 && r["peak_gpu_mem_gb"].is_null()));

    let refused = Command::new(env!("CARGO_BIN_EXE_mgrun"))
        .args(["bench", "step", "--cpus", "1", "--arch", "small_cnn", "--precision", "fp16"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("loss scaling"));
}

fn python() -> std::path::PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// The cell after `label` in the markdown row that starts with `| label |`, split on `|`.
fn cells<'a>(stdout: &'a str, label: &str) -> Vec<&'a str> {
    let line = stdout
        .lines()
        .rfind(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label}:\n{stdout}"));
    line.split('|').map(str::trim).filter(|c| !c.is_empty()).collect()
}

#[test]
fn bench_step_against_pytorch_prints_both_optimizers_per_method_and_phase() {
    let out = Command::new(env!("CARGO_BIN_EXE_mgrun"))
        .args(["bench", "step", "--cpus", "1", "--arch", "resnet18", "--image-size", "16", "--domains", "2"])
        .args(["--batch-per-domain", "2", "--classes", "3", "--steps", "1", "--warmup", "1", "--phases"])
        .args(["--methods", "erm,sam", "--precision", "fp32", "--vs-pytorch", "--rounds", "2", "--python"])
        .arg(python())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("medians of 2 round(s)"), "{stdout}");
    // Method rows of the comparison: mgrun, foreach and fused times, then the two speed ratios.
    for method in ["erm", "sam"] {
        let row = cells(&stdout, method);
        assert_eq!(row.len(), 7, "{row:?}");
        let (ours, foreach, fused): (f64, f64, f64) =
            (row[2].parse().unwrap(), row[3].parse().unwrap(), row[4].parse().unwrap());
        assert!(ours > 0.0 && foreach > 0.0 && fused > 0.0, "{row:?}");
        // "speed [low, high]": the median of the rounds' ratios lies in their range.
        let numbers: Vec<f64> =
            row[6].split(|c: char| !(c.is_ascii_digit() || c == '.')).filter_map(|n| n.parse().ok()).collect();
        let [ratio, low, high] = numbers[..] else { panic!("speed vs fused: {row:?}") };
        assert!(low <= ratio && ratio <= high && low > 0.0, "{row:?}");
    }
    for phase in ["forward+loss", "backward", "optimizer", "eval forward"] {
        let row = cells(&stdout, phase);
        assert_eq!(row.len(), 6, "{phase}: {row:?}");
        assert!(row[1..4].iter().all(|c| c.parse::<f64>().is_ok_and(|ms| ms > 0.0)), "{phase}: {row:?}");
    }
}

#[test]
fn bench_step_times_one_rank_of_a_larger_job() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("step.json");
    let run = |ranks: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_mgrun"))
            .args(["bench", "step", "--cpus", "1", "--arch", "small_cnn", "--width", "8", "--image-size", "16"])
            .args(["--domains", "3", "--batch-per-domain", "4", "--classes", "3", "--steps", "1", "--warmup", "0"])
            .args(["--methods", "erm,dsp_reg", "--precision", "fp32", "--ranks", ranks, "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // images/s x s/step = the images this rank computes per step.
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["images_per_s"].as_f64().unwrap() * r["ms_per_step"].as_f64().unwrap() / 1e3).round())
            .collect::<Vec<f64>>()
    };
    assert_eq!(run("1"), vec![12.0, 12.0]);
    assert_eq!(run("3"), vec![4.0, 4.0], "rank 0 of 3 holds one domain of 4 images");

    let refused = Command::new(env!("CARGO_BIN_EXE_mgrun"))
        .args(["bench", "step", "--cpus", "1", "--arch", "small_cnn", "--ranks", "2", "--vs-pytorch"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--vs-pytorch"));
}
