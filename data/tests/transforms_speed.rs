//! Per-stage timing of one training image (run with `--ignored --nocapture`; numbers only, no assertions).

use mgrun_data::image_io::decode_rgb_bytes;
use mgrun_data::transforms::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, normalize_into, resized_crop, AugmentParams,
};
use std::time::Instant;

#[test]
#[ignore]
fn stage_times() {
    let root = std::env::var("BENCH_JPEG").unwrap_or_else(|_| "../datasets/bench-500x375/art/class_0/000.jpg".into());
    let bytes = std::fs::read(&root).unwrap();
    let n = 50;
    let time = |name: &str, f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        eprintln!("{name}: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    };
    let img = decode_rgb_bytes(&bytes).unwrap();
    time("decode", &mut || drop(decode_rgb_bytes(&bytes).unwrap()));
    time("image crate decode", &mut || drop(image::load_from_memory(&bytes).unwrap()));
    let p = AugmentParams::sample(0, 0, 0, 0, img.width(), img.height());
    time("resized_crop", &mut || drop(resized_crop(&img, p.crop, 224, 224)));
    let small = resized_crop(&img, p.crop, 224, 224);
    time("brightness", &mut || adjust_brightness(&mut small.clone(), 1.1));
    time("contrast", &mut || adjust_contrast(&mut small.clone(), 1.1));
    time("saturation", &mut || adjust_saturation(&mut small.clone(), 1.1));
    time("hue", &mut || adjust_hue(&mut small.clone(), 0.1));
    let mut out = vec![0f32; 3 * 224 * 224];
    time("normalize", &mut || normalize_into(&small, &mut out));
}
