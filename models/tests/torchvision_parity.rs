//! mgrun's ResNets against torchvision (the independent reference): a state dict saved by mgrun
//! must load into `torchvision.models.resnetXX` with strict=True and give the same logits, and in
//! training mode the same BN running statistics and parameter gradients.

use mgrun_models::{build, save_safetensors, Model, ModelSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// float32's unit roundoff, 2^-24.
const UNIT_ROUNDOFF_F32: f64 = 5.960_464_477_539_063e-8;

/// How far two float32 evaluations of the same network may differ when only their kernels' summation
/// orders differ (oneDNN's blocking depends on the CPU and the thread count), derived from the network.
///
/// Every multiply-add of a convolution or linear layer of fan-in n adds rounding errors whose sum grows
/// like sqrt(n) u relative to the layer's output (the probabilistic bound of Higham & Mary, 2019); along
/// the network these add up in quadrature, so the logits carry about sqrt(sum of fan-ins) u times their
/// own scale. With one thread on both sides the logits agree exactly on the machine this was written
/// on; a CI machine of another CPU, with two threads for PyTorch, measured 1.2e-4 for ResNet-50 where
/// this gives about 1.2e-3.
fn logit_tolerance(model: &dyn Model, logits: &Tensor) -> f64 {
    let fan_in_sum: f64 = model
        .store()
        .params()
        .iter()
        .filter(|param| param.tensor.dim() >= 2)
        .map(|param| {
            let size = param.tensor.size();
            (param.tensor.numel() as f64) / (size[0] as f64)
        })
        .sum();
    fan_in_sum.sqrt() * UNIT_ROUNDOFF_F32 * max_abs(logits)
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

fn spec(arch: &str, num_classes: usize) -> ModelSpec {
    ModelSpec { arch: arch.into(), num_classes, freeze_bn: false, dropout: 0.0, width: 0, pretrained: None }
}

/// Runs tests/reference/check_resnet.py and returns its outputs by name.
fn run_reference(
    arch: &str,
    num_classes: usize,
    state: &Path,
    input: &Path,
    out: &Path,
    train: bool,
) -> HashMap<String, Tensor> {
    let script = workspace_root().join("tests/reference/check_resnet.py");
    let mut cmd = Command::new(python());
    cmd.arg(&script)
        .args(["--arch", arch, "--num-classes", &num_classes.to_string()])
        .arg("--state")
        .arg(state)
        .arg("--input")
        .arg(input)
        .arg("--out")
        .arg(out)
        .env("OMP_NUM_THREADS", "1");
    if train {
        cmd.arg("--train");
    }
    let output = cmd.output().unwrap_or_else(|e| panic!("running {} {}: {e}", python().display(), script.display()));
    assert!(
        output.status.success(),
        "check_resnet.py failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Tensor::read_safetensors(out).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

fn max_abs(a: &Tensor) -> f64 {
    a.to_kind(Kind::Double).abs().max().double_value(&[])
}

/// Builds the model, saves its state dict and a seeded input (plus weights for a backward).
fn prepare(model: &dyn Model, dir: &Path, input_shape: [i64; 4], num_classes: i64) -> (Tensor, Tensor) {
    tch::manual_seed(1234);
    let images = Tensor::randn(input_shape, (Kind::Float, Device::Cpu));
    let grad_weights = Tensor::randn([input_shape[0], num_classes], (Kind::Float, Device::Cpu));
    save_safetensors(model.store(), &dir.join("state.safetensors")).unwrap();
    Tensor::write_safetensors(&[("images", &images), ("grad_weights", &grad_weights)], dir.join("input.safetensors"))
        .unwrap();
    (images, grad_weights)
}

#[test]
fn resnet18_matches_torchvision_in_eval_and_train_mode() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let num_classes = 7;
    let mut model = build(&spec("resnet18", num_classes), Device::Cpu, 11).unwrap();
    let (images, grad_weights) = prepare(model.as_ref(), dir.path(), [2, 3, 64, 64], num_classes as i64);
    let reference = run_reference(
        "resnet18",
        num_classes,
        &dir.path().join("state.safetensors"),
        &dir.path().join("input.safetensors"),
        &dir.path().join("out.safetensors"),
        true,
    );

    let eval_logits = tch::no_grad(|| model.forward_t(&images, false));
    let diff = max_abs_diff(&eval_logits, &reference["logits_eval"]);
    let tolerance = logit_tolerance(model.as_ref(), &eval_logits);
    println!(
        "resnet18 eval: max |logit| {:.3e}, max abs diff {diff:.3e} (tolerance {tolerance:.3e})",
        max_abs(&eval_logits)
    );
    assert!(diff <= tolerance, "eval logits differ from torchvision by {diff} > {tolerance}");

    model.store_mut().zero_grad();
    let train_logits = model.forward_t(&images, true);
    let diff = max_abs_diff(&train_logits, &reference["logits_train"]);
    let tolerance = logit_tolerance(model.as_ref(), &train_logits);
    println!(
        "resnet18 train: max |logit| {:.3e}, max abs diff {diff:.3e} (tolerance {tolerance:.3e})",
        max_abs(&train_logits)
    );
    assert!(diff <= tolerance, "train-mode logits differ from torchvision by {diff} > {tolerance}");
    (train_logits * &grad_weights).sum(Kind::Float).backward();

    // Running statistics updated in place by the train-mode forward, and the batch counter.
    let mut buffers_checked = 0;
    for (name, buffer) in model.store().buffers() {
        let expected = &reference[&format!("state.{name}")];
        assert_eq!(buffer.kind(), expected.kind(), "{name}: dtype");
        let diff = max_abs_diff(buffer, expected);
        assert!(diff <= 1e-5, "{name}: differs from torchvision's by {diff}");
        if name.ends_with("num_batches_tracked") {
            assert_eq!(buffer.int64_value(&[]), 1, "{name}");
        }
        buffers_checked += 1;
    }
    assert_eq!(buffers_checked, 20 * 3, "resnet18 has 20 BatchNorm layers");

    // Gradients through the flat-buffer views agree with autograd in PyTorch.
    let mut worst_relative = 0.0f64;
    for param in model.store().params() {
        let grad = param.tensor.grad();
        let expected = &reference[&format!("grad.{}", param.name)];
        let diff = max_abs_diff(&grad, expected);
        let scale = max_abs(expected).max(1e-3);
        worst_relative = worst_relative.max(diff / scale);
        assert!(diff <= 1e-3 * scale, "{}: gradient differs by {diff} (max |grad| {scale})", param.name);
    }
    println!("resnet18 gradients: worst max-abs-diff / max|grad| = {worst_relative:.3e}");
}

#[test]
fn resnet50_matches_torchvision_in_eval_mode() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let num_classes = 5;
    let model = build(&spec("resnet50", num_classes), Device::Cpu, 5).unwrap();
    // Non-trivial running statistics, so that eval mode exercises loading the BN buffers.
    tch::manual_seed(99);
    for (name, buffer) in model.store().buffers() {
        let mut buffer = buffer.shallow_clone();
        if name.ends_with("running_mean") {
            buffer.copy_(&(Tensor::randn(buffer.size(), (Kind::Float, Device::Cpu)) * 0.1));
        } else if name.ends_with("running_var") {
            buffer.copy_(&(Tensor::rand(buffer.size(), (Kind::Float, Device::Cpu)) + 0.5));
        }
    }
    let (images, _) = prepare(model.as_ref(), dir.path(), [2, 3, 64, 64], num_classes as i64);
    let reference = run_reference(
        "resnet50",
        num_classes,
        &dir.path().join("state.safetensors"),
        &dir.path().join("input.safetensors"),
        &dir.path().join("out.safetensors"),
        false,
    );
    let logits = tch::no_grad(|| model.forward_t(&images, false));
    let diff = max_abs_diff(&logits, &reference["logits_eval"]);
    let tolerance = logit_tolerance(model.as_ref(), &logits);
    println!(
        "resnet50 eval: max |logit| {:.3e}, max abs diff {diff:.3e} (tolerance {tolerance:.3e})",
        max_abs(&logits)
    );
    assert!(diff <= tolerance, "eval logits differ from torchvision by {diff} > {tolerance}");
}
