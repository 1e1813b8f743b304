//! Gradients land directly in the store's flat gradient buffer (every .grad is a view of it):
//! `flat_grad` then equals the per-parameter gradients laid out like the flat parameter buffer,
//! backward accumulates in place, and `zero_grad` clears everything, also with channels-last
//! weights.

use mgrun_models::{build_with, Execution, ModelSpec, Precision};
use tch::{Device, Kind, Tensor};

fn check(arch: &str, channels_last: bool) {
    let spec =
        ModelSpec { arch: arch.into(), num_classes: 5, freeze_bn: true, dropout: 0.0, width: 8, pretrained: None };
    let execution = Execution { precision: Precision::Fp32, channels_last };
    let mut model = build_with(&spec, execution, Device::Cpu, 3).unwrap();
    let x = Tensor::from_slice(&(0..2 * 3 * 16 * 16).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect::<Vec<_>>())
        .reshape([2, 3, 16, 16]);
    let y = Tensor::from_slice(&[1i64, 3]);
    let backward = |model: &dyn mgrun_models::Model| {
        model.forward_t(&x, true).cross_entropy_for_logits(&y).backward();
    };

    model.store_mut().zero_grad();
    backward(model.as_ref());
    let store = model.store();
    assert!(store.grads_are_flat_views(), "{arch}: .grad no longer views the flat buffer");
    let flat = store.flat_grad();
    assert!(flat.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    for p in store.params() {
        let expected = p.tensor.grad();
        let got = p.unflatten(&flat);
        assert!(got.equal(&expected), "{arch}: {} differs", p.name);
    }

    // Backward accumulates in place; zero_grad clears.
    backward(model.as_ref());
    let doubled = model.store().flat_grad();
    let rel = (&doubled - &flat * 2.0).norm().double_value(&[]) / flat.norm().double_value(&[]);
    assert!(rel < 1e-6, "{arch}: accumulation off by {rel:e}");
    model.store_mut().zero_grad();
    assert_eq!(model.store().flat_grad().abs().sum(Kind::Double).double_value(&[]), 0.0);
    assert!(model.store().grads_are_flat_views());
}

#[test]
fn small_cnn_gradients_are_flat_views() {
    check("small_cnn", false);
    check("small_cnn", true);
}

#[test]
fn resnet18_gradients_are_flat_views() {
    check("resnet18", false);
    check("resnet18", true);
}
