//! The evaluation transform against torchvision (PIL decode, Resize, ToTensor, Normalize) in the venv.

mod common;

use common::config;
use mgrun_data::{load_eval_batch, Dataset};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")).to_path_buf())
}

/// torchvision's eval transform of `files` at `size`, flattened.
fn torchvision_reference(files: &[PathBuf], size: i64, scratch: &Path) -> Vec<f32> {
    let out = scratch.join(format!("reference_{size}.json"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/eval_transform.py");
    let status = Command::new(python()).arg(script).arg(size.to_string()).arg(&out).args(files).status().unwrap();
    assert!(status.success(), "reference script failed");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    json["x"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn ours(root: &Path, domain: &str, size: i64) -> (Vec<PathBuf>, Vec<f32>) {
    let ds = Dataset::open(&config(root, size)).unwrap();
    let d = ds.domain_index(domain).unwrap();
    let all: Vec<usize> = (0..ds.domains()[d].len()).collect();
    let (x, _) = load_eval_batch(&ds, d, &all, size).unwrap();
    (ds.domains()[d].files.clone(), Vec::<f32>::try_from(&x.flatten(0, -1)).unwrap())
}

fn diffs(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max, mean)
}

#[test]
fn matches_torchvision_eval_transform() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    // Lossless PNGs at the target size in RGB, grayscale and RGBA: decoding, colour conversion and
    // normalisation must agree exactly.
    let size = 12u32;
    let rgb = image::RgbImage::from_fn(size, size, |x, y| image::Rgb([(x * 21) as u8, (y * 19) as u8, (x * y) as u8]));
    let gray = image::GrayImage::from_fn(size, size, |x, y| image::Luma([(x * 7 + y * 13) as u8]));
    let rgba = image::RgbaImage::from_fn(size, size, |x, y| image::Rgba([(y * 20) as u8, 200, (x * 20) as u8, 128]));
    std::fs::create_dir_all(root.join("exact/c")).unwrap();
    rgb.save(root.join("exact/c/a_rgb.png")).unwrap();
    gray.save(root.join("exact/c/b_gray.png")).unwrap();
    rgba.save(root.join("exact/c/c_rgba.png")).unwrap();
    let (files, x) = ours(&root, "exact", size as i64);
    let reference = torchvision_reference(&files, size as i64, dir.path());
    let (max, _) = diffs(&x, &reference);
    assert!(max <= 1e-6, "exact-size PNGs differ from torchvision by {max}");

    // Downscaling 40x30 -> 12x12: our triangle filter is close to PIL's antialiased bilinear, not identical.
    let big = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, if (x / 4 + y / 4) % 2 == 0 { 30 } else { 220 }])
    });
    std::fs::create_dir_all(root.join("resized/c")).unwrap();
    big.save(root.join("resized/c/big.png")).unwrap();
    let (files, x) = ours(&root, "resized", 12);
    let reference = torchvision_reference(&files, 12, dir.path());
    let (max, mean) = diffs(&x, &reference);
    eprintln!("resize 40x30 -> 12x12 vs torchvision: max |diff| {max:.4}, mean {mean:.4} (normalised units)");
    assert!(mean < 0.005 && max < 0.1, "resize differs from torchvision: max {max}, mean {mean}");

    // JPEG (the synthetic data): decoders may round IDCT/upsampling slightly differently.
    let synth = dir.path().join("synth");
    let opts =
        mgrun_data::synthetic::SyntheticOptions { out: synth.clone(), seed: 1, images_per_class: 2, image_size: 32 };
    mgrun_data::synthetic::generate(&opts).unwrap();
    let (files, x) = ours(&synth, "photo", 32);
    let reference = torchvision_reference(&files, 32, dir.path());
    let (max, mean) = diffs(&x, &reference);
    eprintln!("JPEG decode vs PIL: max |diff| {max:.4}, mean {mean:.5} (normalised units)");
    assert!(mean < 0.002 && max < 0.06, "JPEG decoding differs from PIL: max {max}, mean {mean}");
}
