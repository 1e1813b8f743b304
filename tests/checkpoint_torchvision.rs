//! Weights in and out: a torchvision ResNet-18 exported from PyTorch and loaded with
//! `model.pretrained` gives torchvision's eval-mode logits (max abs diff <= 1e-4), also in
//! DomainBed's naming and with another class count (the head is skipped); and the model.safetensors
//! mgrun writes loads into torchvision with strict=True and gives mgrun's logits.

use mgrun_models::ModelSpec;
use mgrun_tests::*;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use tch::{Device, Tensor};

const CLASSES: usize = 7;

fn spec(num_classes: usize) -> ModelSpec {
    ModelSpec { arch: "resnet18".into(), num_classes, freeze_bn: true, dropout: 0.0, width: 64, pretrained: None }
}

fn python(args: &[&str]) {
    let out = Command::new(mgrun_tests::python()).args(args).output().expect("starting the reference Python");
    assert!(out.status.success(), "{args:?}:\n{}{}", text(&out.stdout), text(&out.stderr));
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn torchvision_weights_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let reference = workspace_root().join("tests/reference");
    let out = dir.path().to_str().unwrap();
    let classes = CLASSES.to_string();
    python(&[
        reference.join("export_torchvision.py").to_str().unwrap(),
        "--arch",
        "resnet18",
        "--num-classes",
        &classes,
        "--out",
        out,
    ]);
    let weights = dir.path().join("weights.safetensors");
    let io = tensors(&dir.path().join("io.safetensors"));
    let images = &io["images"];

    // In: torchvision names.
    let mut model = mgrun_models::build(&spec(CLASSES), Device::Cpu, 1).unwrap();
    let report = mgrun_checkpoint::load_pretrained(model.store_mut(), &weights).unwrap();
    assert!(report.head_skipped.is_none());
    let logits = tch::no_grad(|| model.forward_t(images, false));
    let diff = max_abs_diff(&logits, &io["logits_eval"]);
    assert!(diff <= 1e-4, "imported logits differ from torchvision's by {diff:e}");

    // In: DomainBed's names (featurizer.network.<name>, classifier.*) give the same model.
    let renamed: Vec<(String, Tensor)> = tensors(&weights)
        .into_iter()
        .map(|(k, t)| match k.strip_prefix("fc.") {
            Some(rest) => (format!("classifier.{rest}"), t),
            None => (format!("featurizer.network.{k}"), t),
        })
        .collect();
    let domainbed = dir.path().join("domainbed.safetensors");
    Tensor::write_safetensors(&renamed, &domainbed).unwrap();
    let mut model_db = mgrun_models::build(&spec(CLASSES), Device::Cpu, 2).unwrap();
    mgrun_checkpoint::load_pretrained(model_db.store_mut(), &domainbed).unwrap();
    assert!(model_db.store().flat().equal(model.store().flat()));

    // In, another class count: the featurizer loads, the head is skipped and says why.
    let mut other = mgrun_models::build(&spec(CLASSES + 3), Device::Cpu, 1).unwrap();
    let report = mgrun_checkpoint::load_pretrained(other.store_mut(), &weights).unwrap();
    let note = report.head_skipped.expect("the head must be skipped");
    assert!(note.contains("fc.weight"), "{note}");
    let features = tch::no_grad(|| other.features(images, false));
    let expected = tch::no_grad(|| model.features(images, false));
    assert!(max_abs_diff(&features, &expected) <= 1e-5);

    // A wrong architecture is refused.
    let mut cnn =
        mgrun_models::build(&ModelSpec { arch: "small_cnn".into(), ..spec(CLASSES) }, Device::Cpu, 1).unwrap();
    let err = format!("{:#}", mgrun_checkpoint::load_pretrained(cnn.store_mut(), &weights).unwrap_err());
    assert!(err.contains("missing keys") || err.contains("shape"), "{err}");

    // Out: what mgrun writes loads into torchvision strictly, with the same logits.
    let trained = mgrun_models::build(&spec(CLASSES), Device::Cpu, 5).unwrap();
    let state = dir.path().join("model.safetensors");
    mgrun_models::io::save_safetensors(trained.store(), &state).unwrap();
    let logits = tch::no_grad(|| trained.forward_t(images, false));
    let io_out = dir.path().join("io_out.safetensors");
    Tensor::write_safetensors(&[("images", images.shallow_clone()), ("logits_eval", logits)], &io_out).unwrap();
    python(&[
        reference.join("check_export.py").to_str().unwrap(),
        "--arch",
        "resnet18",
        "--num-classes",
        &classes,
        "--state",
        state.to_str().unwrap(),
        "--io",
        io_out.to_str().unwrap(),
    ]);
}
