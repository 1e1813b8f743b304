//! A channels-last model (4-D weights stored NHWC inside the flat buffer) computes the same
//! function, gradients and updates as the NCHW one, and exports/imports torchvision's NCHW
//! tensors; a bf16 model stays close to fp32 with f32 outputs and gradients.
use mgrun_models::{build_with, Execution, Model, ModelSpec, Precision};
use tch::{Device, Kind, Reduction, Tensor};

const CLASSES: usize = 5;

/// Initialisation seeds libtorch's global generator: tests that build models run one at a time.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn spec(arch: &str) -> ModelSpec {
    ModelSpec { arch: arch.into(), num_classes: CLASSES, freeze_bn: false, dropout: 0.0, width: 8, pretrained: None }
}

fn model(arch: &str, channels_last: bool, precision: Precision) -> Box<dyn Model> {
    build_with(&spec(arch), Execution { precision, channels_last }, Device::Cpu, 7).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let x = Tensor::randn([6, 3, 32, 32], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 3, 4, 0]);
    (x, y)
}

/// Loss, logits and the flat gradient of one training-mode forward/backward.
fn step(model: &mut dyn Model, x: &Tensor, y: &Tensor) -> (Tensor, Tensor) {
    model.store_mut().zero_grad();
    let logits = model.forward_t(x, true);
    logits.cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0).backward();
    (logits.detach(), model.store().flat_grad())
}

/// Every parameter's logical NCHW value, as `unflatten` presents `flat_like`.
fn logical(model: &dyn Model, flat_like: &Tensor) -> Vec<(String, Tensor)> {
    model.store().params().iter().map(|p| (p.name.clone(), p.unflatten(flat_like).contiguous())).collect()
}

fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.size(), b.size(), "{what}: shapes");
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    assert!(diff <= tol * scale, "{what}: max |diff| {diff} > {tol} * {scale}");
}

fn check_same_function(arch: &str) {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (x, y) = batch();
    let mut nchw = model(arch, false, Precision::Fp32);
    let mut nhwc = model(arch, true, Precision::Fp32);
    assert!(nhwc.store().params().iter().any(|p| p.channels_last), "{arch}: no channels-last weight");
    let conv = nhwc.store().params().iter().find(|p| p.channels_last).unwrap();
    let s = &conv.shape;
    assert_eq!(conv.tensor.stride(), vec![s[2] * s[3] * s[1], 1, s[3] * s[1], s[1]], "{arch}: NHWC strides");
    // Same initial parameters (read through the views), in different flat orders.
    for ((name, a), (_, b)) in
        logical(nhwc.as_ref(), nhwc.store().flat()).iter().zip(logical(nchw.as_ref(), nchw.store().flat()))
    {
        assert!(a.equal(&b), "{arch}: initial {name} differs by {}", (a - &b).abs().max());
    }

    let (logits_a, grad_a) = step(nchw.as_mut(), &x, &y);
    let (logits_b, grad_b) = step(nhwc.as_mut(), &x, &y);
    assert_close(&format!("{arch} logits"), &logits_b, &logits_a, 1e-4);
    for ((name, gb), (_, ga)) in logical(nhwc.as_ref(), &grad_b).iter().zip(logical(nchw.as_ref(), &grad_a)) {
        assert_close(&format!("{arch} grad {name}"), gb, &ga, 1e-3);
    }

    // An element-wise update on the flat buffers (what Adam does) moves both models alike.
    for (m, g) in [(&nchw, &grad_a), (&nhwc, &grad_b)] {
        let updated = m.store().flat() - g * 0.5;
        m.store().set_flat(&updated).unwrap();
    }
    let (after_a, _) = step(nchw.as_mut(), &x, &y);
    let (after_b, _) = step(nhwc.as_mut(), &x, &y);
    assert!(!after_a.allclose(&logits_a, 1e-3, 1e-3, false), "{arch}: the update changed nothing");
    assert_close(&format!("{arch} logits after update"), &after_b, &after_a, 1e-3);

    // safetensors export presents NCHW tensors: channels-last -> NCHW model and back.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    mgrun_models::save_safetensors(nhwc.store(), &path).unwrap();
    let mut fresh_nchw = model(arch, false, Precision::Fp32);
    mgrun_models::load_safetensors(fresh_nchw.store_mut(), &path, true).unwrap();
    let mut fresh_nhwc = model(arch, true, Precision::Fp32);
    mgrun_models::load_safetensors(fresh_nhwc.store_mut(), &path, true).unwrap();
    for (name, t) in nhwc.store().named_tensors() {
        let loaded = fresh_nchw.store().named_tensors().into_iter().find(|(n, _)| *n == name).unwrap().1;
        assert!(loaded.equal(&t), "{arch}: {name} after channels-last -> NCHW round trip");
    }
    assert!(fresh_nhwc.store().flat().equal(nhwc.store().flat()), "{arch}: channels-last round trip");
}

#[test]
fn channels_last_small_cnn_matches_nchw() {
    check_same_function("small_cnn");
}

#[test]
fn channels_last_resnet18_matches_nchw() {
    check_same_function("resnet18");
}

#[test]
fn bf16_forward_is_close_to_fp32_with_f32_outputs_and_gradients() {
    let _rng = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (x, y) = batch();
    let mut fp32 = model("small_cnn", false, Precision::Fp32);
    let mut bf16 = model("small_cnn", false, Precision::Bf16);
    let (logits_a, grad_a) = step(fp32.as_mut(), &x, &y);
    let (logits_b, grad_b) = step(bf16.as_mut(), &x, &y);
    assert_eq!(logits_b.kind(), Kind::Float);
    assert_eq!(grad_b.kind(), Kind::Float);
    assert!(!logits_b.equal(&logits_a), "bf16 forward gave bit-identical fp32 logits: autocast is off");
    assert_close("bf16 logits", &logits_b, &logits_a, 5e-2);
    let cos = (&grad_a * &grad_b).sum(Kind::Float).double_value(&[])
        / (grad_a.norm().double_value(&[]) * grad_b.norm().double_value(&[]));
    assert!(cos > 0.99, "bf16 gradient direction: cosine {cos}");
    // The autocast region ends with the forward pass.
    assert!(!mgrun_torch_shim::autocast_enabled(Device::Cpu));
}
