//! ResNet structure, frozen BatchNorm, and safetensors state-dict I/O (round trip and strict errors).

use mgrun_models::resnet::ResNet;
use mgrun_models::{build, load_safetensors, save_safetensors, Model, ModelSpec, ParamKind, ParamStore};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tch::{Device, Kind, Tensor};

/// Model initialisation seeds libtorch's global generator, so tests that draw random numbers run
/// one at a time to stay deterministic.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    tch::set_num_threads(1);
    GLOBAL_RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn spec(arch: &str, num_classes: usize, freeze_bn: bool) -> ModelSpec {
    ModelSpec { arch: arch.into(), num_classes, freeze_bn, dropout: 0.0, width: 0, pretrained: None }
}

fn buffer<'a>(store: &'a ParamStore, name: &str) -> &'a Tensor {
    &store.buffers().iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no buffer {name}")).1
}

fn snapshot_buffers(store: &ParamStore) -> Vec<(String, Tensor)> {
    store.buffers().iter().map(|(n, t)| (n.clone(), t.copy())).collect()
}

fn write(tensors: &[(String, Tensor)], path: &Path) {
    Tensor::write_safetensors(tensors, path).unwrap();
}

#[test]
fn parameter_counts_and_feature_widths_match_torchvision() {
    let _serial = serial();
    // torchvision's published parameter counts for 1000 classes.
    for (arch, expected_params, feature_dim) in [("resnet18", 11_689_512, 512), ("resnet50", 25_557_032, 2048)] {
        let model = ResNet::new(&spec(arch, 1000, false), Device::Cpu, 0).unwrap();
        assert_eq!(model.store().numel(), expected_params, "{arch}");
        assert_eq!(model.feature_dim(), feature_dim, "{arch}");
        let features =
            tch::no_grad(|| model.features(&Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu)), false));
        assert_eq!(features.size(), [2, feature_dim], "{arch}");
    }
}

#[test]
fn parameter_kinds_names_and_initialisation() {
    let _serial = serial();
    let model = build(&spec("resnet18", 7, false), Device::Cpu, 3).unwrap();
    let params = model.store().params();
    assert_eq!(params.first().unwrap().name, "conv1.weight");
    assert_eq!(params.last().unwrap().name, "fc.bias");
    for p in params {
        let expected_kind = if p.name.contains("bn") || p.name.contains("downsample.1") {
            if p.name.ends_with("weight") {
                ParamKind::NormWeight
            } else {
                ParamKind::NormBias
            }
        } else if p.name.ends_with("bias") {
            ParamKind::Bias
        } else {
            ParamKind::Weight
        };
        assert_eq!(p.kind, expected_kind, "{}", p.name);
        match p.kind {
            ParamKind::NormWeight => assert_eq!(p.tensor.min().double_value(&[]), 1.0, "{}", p.name),
            ParamKind::NormBias => assert_eq!(p.tensor.abs().max().double_value(&[]), 0.0, "{}", p.name),
            _ => {}
        }
    }
    // kaiming_normal(fan_out): conv1 is [64, 3, 7, 7], fan_out = 64 * 49.
    let conv1 = &params[0].tensor;
    let expected_std = (2.0 / (64.0 * 49.0f64)).sqrt();
    let std = conv1.std(true).double_value(&[]);
    assert!((std / expected_std - 1.0).abs() < 0.05, "conv1 std {std}, expected {expected_std}");
    // Linear default: U(-1/sqrt(512), 1/sqrt(512)).
    let fc = &params.iter().find(|p| p.name == "fc.weight").unwrap().tensor;
    let bound = 1.0 / 512f64.sqrt();
    let max = fc.abs().max().double_value(&[]);
    assert!(max <= bound && max > 0.9 * bound, "fc.weight max {max}, bound {bound}");
    // The same seed gives the same model, another seed another.
    let again = build(&spec("resnet18", 7, false), Device::Cpu, 3).unwrap();
    assert!(again.store().flat().equal(model.store().flat()));
    let other = build(&spec("resnet18", 7, false), Device::Cpu, 4).unwrap();
    assert!(!other.store().flat().equal(model.store().flat()));
}

#[test]
fn frozen_bn_keeps_running_statistics_in_training_mode() {
    let _serial = serial();
    tch::manual_seed(0);
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));

    let frozen = build(&spec("resnet18", 4, true), Device::Cpu, 1).unwrap();
    let before = snapshot_buffers(frozen.store());
    let train_logits = frozen.forward_t(&images, true);
    for ((name, old), (_, new)) in before.iter().zip(frozen.store().buffers()) {
        assert!(old.equal(new), "{name} changed with freeze_bn = true");
    }
    // With dropout 0, frozen BN makes training mode compute exactly what eval mode does.
    let eval_logits = tch::no_grad(|| frozen.forward_t(&images, false));
    assert!(train_logits.detach().allclose(&eval_logits, 0.0, 0.0, false));

    // Without freezing, the same forward updates every running statistic and the counter.
    let live = build(&spec("resnet18", 4, false), Device::Cpu, 1).unwrap();
    let train_logits = live.forward_t(&images, true);
    assert!(!train_logits.detach().allclose(&eval_logits, 1e-3, 1e-3, false));
    for ((name, old), (_, new)) in before.iter().zip(live.store().buffers()) {
        assert!(!old.equal(new), "{name} unchanged with freeze_bn = false");
    }
    assert_eq!(buffer(live.store(), "layer4.1.bn2.num_batches_tracked").int64_value(&[]), 1);
    // Eval mode never touches the statistics.
    let before_eval = snapshot_buffers(live.store());
    let _ = tch::no_grad(|| live.forward_t(&images, false));
    for ((name, old), (_, new)) in before_eval.iter().zip(live.store().buffers()) {
        assert!(old.equal(new), "{name} changed in eval mode");
    }
}

#[test]
fn save_and_load_round_trip_restores_parameters_and_buffers() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let source = build(&spec("resnet18", 3, false), Device::Cpu, 21).unwrap();
    // Give the buffers non-initial values (running stats and counters).
    let _ = source.forward_t(&Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu)), true);
    save_safetensors(source.store(), &path).unwrap();

    let written: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&path).unwrap().into_iter().collect();
    assert_eq!(written.len(), source.store().params().len() + source.store().buffers().len());
    let counter = &written["bn1.num_batches_tracked"];
    assert_eq!((counter.kind(), counter.size(), counter.int64_value(&[])), (Kind::Int64, vec![], 1));
    assert_eq!(written["layer1.0.conv1.weight"].kind(), Kind::Float);

    let mut target = build(&spec("resnet18", 3, false), Device::Cpu, 22).unwrap();
    assert!(!target.store().flat().equal(source.store().flat()));
    load_safetensors(target.store_mut(), &path, true).unwrap();
    assert!(target.store().flat().equal(source.store().flat()));
    for ((name, a), (_, b)) in source.store().buffers().iter().zip(target.store().buffers()) {
        assert!(a.equal(b), "{name} not restored");
    }
    // The parameters are still views of the flat buffer, so loading reached them too.
    let images = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let (a, b) = tch::no_grad(|| (source.forward_t(&images, false), target.forward_t(&images, false)));
    assert!(a.equal(&b));
}

#[test]
fn strict_load_rejects_missing_unexpected_and_misshapen_keys() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let source = build(&spec("resnet18", 3, false), Device::Cpu, 31).unwrap();
    let full = source.store().named_tensors();
    let mut target = build(&spec("resnet18", 3, false), Device::Cpu, 32).unwrap();
    let original_flat = target.store().flat().copy();

    let missing_path = dir.path().join("missing.safetensors");
    let without_bias: Vec<_> =
        full.iter().filter(|(n, _)| n != "fc.bias").map(|(n, t)| (n.clone(), t.copy())).collect();
    write(&without_bias, &missing_path);
    let err = format!("{:#}", load_safetensors(target.store_mut(), &missing_path, true).unwrap_err());
    assert!(err.contains("missing") && err.contains("fc.bias") && err.contains("missing.safetensors"), "{err}");

    let unexpected_path = dir.path().join("unexpected.safetensors");
    let mut with_extra: Vec<_> = full.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    with_extra.push(("head.extra.weight".into(), Tensor::zeros([2], (Kind::Float, Device::Cpu))));
    write(&with_extra, &unexpected_path);
    let err = format!("{:#}", load_safetensors(target.store_mut(), &unexpected_path, true).unwrap_err());
    assert!(err.contains("unexpected") && err.contains("head.extra.weight") && err.contains("unexpected.safetensors"));

    let shape_path = dir.path().join("shape.safetensors");
    let mut wrong_shape: Vec<_> = full.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    for (name, t) in &mut wrong_shape {
        if name == "fc.weight" {
            *t = Tensor::zeros([4, 512], (Kind::Float, Device::Cpu));
        }
    }
    write(&wrong_shape, &shape_path);
    for strict in [true, false] {
        let err = format!("{:#}", load_safetensors(target.store_mut(), &shape_path, strict).unwrap_err());
        assert!(err.contains("fc.weight") && err.contains("[4, 512]") && err.contains("shape.safetensors"), "{err}");
    }
    let err = format!(
        "{:#}",
        load_safetensors(target.store_mut(), &dir.path().join("absent.safetensors"), true).unwrap_err()
    );
    assert!(err.contains("absent.safetensors"), "{err}");
    // Failed loads copy nothing.
    assert!(target.store().flat().equal(&original_flat));

    // Non-strict loads skip missing and unexpected keys and copy the rest.
    load_safetensors(target.store_mut(), &missing_path, false).unwrap();
    load_safetensors(target.store_mut(), &unexpected_path, false).unwrap();
    assert!(target.store().flat().equal(source.store().flat()));
}
