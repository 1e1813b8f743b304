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
