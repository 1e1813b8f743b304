//! DomainBed's transforms against torchvision's functional ops on PIL images (tests/reference/transforms.py),
//! with the random parameters fixed. Inputs are lossless PNGs so that both sides start from the same pixels.
//! Colour ops, flips and grayscale agree exactly (uint8 equal). Resampling reimplements PIL's fixed-point
//! two-pass filter (horizontal pass, uint8 intermediate, vertical pass) and is exact whenever PIL takes that
//! order; Pillow 13 does the vertical pass first for some size combinations (e.g. 30x46 -> 32x32, upscaled in x
//! and downscaled in y), which moves a few percent of the values by one uint8 level, so resizes are held to
//! <= 1 level and the whole training transform to <= 3 levels after the jitter ops (~0.05 normalised).

use image::RgbImage;
use mgrun_data::image_io::decode_rgb;
use mgrun_data::transforms::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, eval_transform, normalize_into, resized_crop,
    to_grayscale, train_transform, AugmentParams, CropBox, Jitter,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python")).to_path_buf())
}

/// Runs the reference on `cases`; one flattened output per case.
fn torchvision(cases: &[Value], scratch: &Path) -> Vec<Vec<f64>> {
    let (input, output) = (scratch.join("cases.json"), scratch.join("out.json"));
    std::fs::write(&input, serde_json::to_vec(&json!({ "cases": cases })).unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/transforms.py");
    let status = Command::new(python()).arg(script).arg(&input).arg(&output).status().unwrap();
    assert!(status.success(), "reference script failed");
    let out: Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    out["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
        .collect()
}

/// A busy test picture: gradients, saturated and gray patches, a checkerboard and hash noise, so that crops,
/// resampling and every colour branch (each HSV sector, gray pixels, clipping) are exercised.
fn test_image(width: u32, height: u32, salt: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let noise = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ salt.wrapping_mul(83_492_791)) >> 7;
        let region = (x * 4 / width) + 4 * (y * 3 / height);
        let p = match region % 6 {
            0 => [(x * 255 / width) as u8, (y * 255 / height) as u8, 128],
            1 => [255, (noise % 256) as u8, 0],
            2 => {
                let v = ((x / 3 + y / 3) % 2 * 230 + 10) as u8;
                [v, v, v]
            }
            3 => [(noise % 256) as u8, ((noise >> 8) % 256) as u8, ((noise >> 16) % 256) as u8],
            4 => [0, 40 + (x % 200) as u8, 255],
            _ => [250, 250, (noise % 16) as u8 + 240],
        };
        image::Rgb(p)
    })
}

struct Fixture {
    _dir: tempfile::TempDir,
    scratch: PathBuf,
    /// (path, the decoded image)
    images: Vec<(PathBuf, RgbImage)>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().to_path_buf();
    let images = [(61, 47, 1), (300, 200, 2), (224, 224, 3)]
        .into_iter()
        .map(|(w, h, salt)| {
            let path = scratch.join(format!("img_{w}x{h}.png"));
            test_image(w, h, salt).save(&path).unwrap();
            let decoded = decode_rgb(&path).unwrap();
            (path, decoded)
        })
        .collect();
    Fixture { _dir: dir, scratch, images }
}

fn bytes(values: &[f64]) -> Vec<u8> {
    values.iter().map(|&v| v as u8).collect()
}

/// Positions where two uint8 buffers differ, and the largest difference.
fn mismatch(ours: &[u8], reference: &[u8]) -> (usize, u8) {
    assert_eq!(ours.len(), reference.len());
    let diffs = ours.iter().zip(reference).map(|(a, b)| a.abs_diff(*b)).filter(|&d| d > 0);
    diffs.fold((0, 0), |(n, max), d| (n + 1, max.max(d)))
}

#[test]
fn resizes_and_crops_match_pil() {
    let fx = fixture();
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    for (path, img) in &fx.images {
        let (w, h) = (img.width(), img.height());
        // Eval Resize: down, up, and to a size not dividing the source.
        for size in [224, 24, 17, 96] {
            cases.push(json!({"image": path, "op": "resize", "size": size}));
            ours.push(eval_transform(img, size).into_raw());
        }
        // RandomResizedCrop boxes: interior, touching edges, tall, wide, full, tiny.
        let boxes = [
            CropBox { top: h / 7, left: w / 5, height: h * 3 / 4, width: w * 2 / 3 },
            CropBox { top: 0, left: w - w * 4 / 5, height: h, width: w * 4 / 5 },
            CropBox { top: 1, left: 0, height: h - 1, width: w / 2 },
            CropBox::whole(w, h),
            CropBox { top: h / 2, left: w / 2, height: 3, width: 5 },
        ];
        for b in boxes {
            for size in [224, 32] {
                cases.push(json!({"image": path, "op": "resized_crop", "top": b.top, "left": b.left,
                                  "height": b.height, "width": b.width, "size": size}));
                ours.push(resized_crop(img, b, size, size).into_raw());
            }
        }
    }
    let reference = torchvision(&cases, &fx.scratch);
    let (mut differing, mut total, mut exact_cases) = (0, 0, 0);
    for (i, (case, (ours, theirs))) in cases.iter().zip(ours.iter().zip(&reference)).enumerate() {
        let (n, max) = mismatch(ours, &bytes(theirs));
        assert!(max <= 1 && n * 10 <= ours.len(), "case {i} {case}: {n} values differ from PIL, by up to {max}");
        differing += n;
        total += ours.len();
        exact_cases += usize::from(n == 0);
    }
    eprintln!(
        "resize vs PIL: {exact_cases}/{} cases bit-exact; {differing} of {total} values off by one level",
        cases.len()
    );
    assert!(exact_cases * 3 >= cases.len() * 2, "only {exact_cases} of {} cases exact", cases.len());
}

#[test]
fn colour_ops_match_torchvision_exactly() {
    let fx = fixture();
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    type Op = fn(&mut RgbImage, f64);
    let ops: [(&str, Op, &[f64]); 4] = [
        ("brightness", adjust_brightness, &[0.7, 0.93, 1.0, 1.17, 1.3]),
        ("contrast", adjust_contrast, &[0.7, 0.888, 1.2345, 1.3]),
        ("saturation", adjust_saturation, &[0.7, 0.95, 1.11, 1.3]),
        ("hue", adjust_hue, &[-0.3, -0.123, -0.001, 0.0, 0.05, 0.2999]),
    ];
    for (path, img) in &fx.images {
        for (name, op, factors) in &ops {
            for &factor in *factors {
                cases.push(json!({"image": path, "op": name, "factor": factor}));
                let mut out = img.clone();
                op(&mut out, factor);
                ours.push(out.into_raw());
            }
        }
        cases.push(json!({"image": path, "op": "grayscale"}));
        let mut gray = img.clone();
        to_grayscale(&mut gray);
        ours.push(gray.into_raw());
        cases.push(json!({"image": path, "op": "hflip"}));
        ours.push(image::imageops::flip_horizontal(img).into_raw());
    }
    let reference = torchvision(&cases, &fx.scratch);
    for (i, (case, (ours, theirs))) in cases.iter().zip(ours.iter().zip(&reference)).enumerate() {
        let (n, max) = mismatch(ours, &bytes(theirs));
        assert_eq!(n, 0, "case {i} {case}: {n} values differ from torchvision, by up to {max}");
    }
}

#[test]
fn whole_training_transform_matches_torchvision_with_sampled_parameters() {
    let fx = fixture();
    let size = 64;
    let mut cases = Vec::new();
    let mut ours = Vec::new();
    let mut grays = 0;
    for (k, (path, img)) in fx.images.iter().enumerate() {
        for position in 0..12 {
            // Parameters drawn by our sampler (many crops, orders, flips; grayscale forced on a few).
            let mut params = AugmentParams::sample(9, k, 4, position, img.width(), img.height());
            params.grayscale |= position % 5 == 0;
            grays += usize::from(params.grayscale);
            let jitter: Vec<Value> = params
                .jitter
                .iter()
                .map(|j| match *j {
                    Jitter::Brightness(f) => json!(["brightness", f]),
                    Jitter::Contrast(f) => json!(["contrast", f]),
                    Jitter::Saturation(f) => json!(["saturation", f]),
                    Jitter::Hue(f) => json!(["hue", f]),
                })
                .collect();
            let c = params.crop;
            cases.push(json!({"image": path, "op": "train", "crop": [c.top, c.left, c.height, c.width],
                              "size": size, "flip": params.flip, "jitter": jitter, "grayscale": params.grayscale}));
            let mut x = vec![0f32; 3 * (size * size) as usize];
            normalize_into(&train_transform(img, &params, size), &mut x);
            ours.push(x);
        }
    }
    assert!(grays >= 9, "grayscale branch barely exercised");
    let reference = torchvision(&cases, &fx.scratch);
    // One uint8 level is 1 / 255 / std ~ 0.0175 normalised; f32 rounding of ToTensor/Normalize is ~1e-7.
    let level = 1.0 / 255.0 / 0.224;
    let (mut exact, mut sum, mut count) = (0, 0.0, 0);
    for (i, (case, (ours, theirs))) in cases.iter().zip(ours.iter().zip(&reference)).enumerate() {
        let diffs: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| (f64::from(*a) - b).abs()).collect();
        let max = diffs.iter().copied().fold(0.0, f64::max);
        assert!(max <= 3.0 * level + 1e-6, "case {i} {case}: differs from torchvision by up to {max}");
        exact += usize::from(max <= 1e-6);
        sum += diffs.iter().sum::<f64>();
        count += diffs.len();
    }
    let mean = sum / count as f64;
    eprintln!("training transform vs torchvision: {exact}/{} exact, mean |diff| {mean:.2e}", cases.len());
    assert!(mean < 0.05 * level, "mean difference {mean}");
}
