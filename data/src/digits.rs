//! Offline domain-generalization datasets made from real handwriting: scikit-learn's digits (1,797
//! scans of 8x8 pixels, 16 grey levels, 10 classes, shipped with the package as
//! `sklearn/datasets/data/digits.csv.gz`), in the spirit of DomainBed's RotatedMNIST and ColoredMNIST
//! (`mgrun datagen rotated_digits|colored_digits --out DIR`).
//!
//! As in DomainBed's `MultipleEnvironmentMNIST`, the images are shuffled once (here with a seeded
//! ChaCha permutation, not torch's) and environment `i` of `n` takes every `n`-th image from `i`, so no
//! scan appears in two domains.
//!
//! - `rotated_digits`: six domains, the digit rotated by 0, 15, 30, 45, 60 and 75 degrees
//!   (RotatedMNIST's angles), upscaled to `image_size` px with bilinear sampling, white on black;
//!   10 classes; about 300 images per domain.
//! - `colored_digits`: three domains; the label is binary (digit 0-4 or 5-9), flipped for 25% of the
//!   images, and the digit is drawn red or green: the colour agrees with the label for 90% (`plus90`)
//!   and 80% (`plus80`) of the images and for only 10% in `minus90`, where the correlation is reversed
//!   (ColoredMNIST's +90%, +80% and -90% environments); about 600 images per domain.
//!
//! Every image is a pure function of the source file and the seed; images are written as PNG (lossless
//! for 16-level handwriting).

use crate::sampler::mix_seed;
use crate::synthetic::prepare_generated_dir;
use anyhow::{bail, Context, Result};
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Side of the source scans.
const SCAN: usize = 8;
/// The part of the image side that the upscaled scan covers.
const DIGIT_FRACTION: f32 = 20.0 / 28.0;
/// Highest grey level of the source scans.
const SCAN_LEVELS: f32 = 16.0;
/// Scans in scikit-learn's file.
pub const SCANS: usize = 1797;
/// Hidden file marking a directory as written by [`generate`], so that it may be regenerated in place.
pub const MARKER_FILE: &str = ".mgrun-digits";
const STREAM_SHUFFLE: u64 = 0x4449_4749_0000_0001;
const STREAM_COLOR: u64 = 0x4449_4749_0000_0002;

/// The rotation of each `rotated_digits` domain, in degrees, in environment order.
pub const ROTATIONS: [(&str, f32); 6] =
    [("rot0", 0.0), ("rot15", 15.0), ("rot30", 30.0), ("rot45", 45.0), ("rot60", 60.0), ("rot75", 75.0)];
/// `colored_digits` domains in environment order, each with the probability that the colour
/// disagrees with the (noisy) label.
pub const COLOR_ENVIRONMENTS: [(&str, f64); 3] = [("plus90", 0.1), ("plus80", 0.2), ("minus90", 0.9)];
/// The probability that a `colored_digits` label is flipped (ColoredMNIST's label noise).
pub const LABEL_NOISE: f64 = 0.25;
/// `colored_digits` class directories: digits 0-4 and 5-9.
pub const BINARY_CLASSES: [&str; 2] = ["digit_0_4", "digit_5_9"];

/// Which dataset to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DigitsKind {
    Rotated,
    Colored,
}

impl DigitsKind {
    pub fn name(self) -> &'static str {
        match self {
            DigitsKind::Rotated => "rotated_digits",
            DigitsKind::Colored => "colored_digits",
        }
    }

    fn domains(self) -> Vec<&'static str> {
        match self {
            DigitsKind::Rotated => ROTATIONS.iter().map(|(d, _)| *d).collect(),
            DigitsKind::Colored => COLOR_ENVIRONMENTS.iter().map(|(d, _)| *d).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DigitsOptions {
    pub kind: DigitsKind,
    /// Dataset root to write: `out/<domain>/<class>/<scan index>.png`.
    pub out: PathBuf,
    /// scikit-learn's `digits.csv.gz`.
    pub source: PathBuf,
    pub seed: u64,
    /// Width and height of the written images.
    pub image_size: u32,
}

/// The scans: 64 grey levels (0-16) per image, row by row, and the digit.
pub struct Scans {
    pub pixels: Vec<[u8; SCAN * SCAN]>,
    pub digits: Vec<u8>,
}

/// Reads scikit-learn's `digits.csv.gz`: one scan a line, 64 grey levels then the digit.
pub fn read_scans(path: &Path) -> Result<Scans> {
    let file = fs::File::open(path).with_context(|| format!("opening the digits file {}", path.display()))?;
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: not a gzip-compressed text file", path.display()))?;
    let mut scans = Scans { pixels: Vec::new(), digits: Vec::new() };
    for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<f64> = line
            .split(',')
            .map(|v| v.trim().parse::<f64>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}:{}: not a row of numbers", path.display(), number + 1))?;
        let valid = |v: f64, max: f64| v.fract() == 0.0 && (0.0..=max).contains(&v);
        if values.len() != SCAN * SCAN + 1
            || !values[..SCAN * SCAN].iter().all(|&v| valid(v, SCAN_LEVELS as f64))
            || !valid(values[SCAN * SCAN], 9.0)
        {
            bail!(
                "{}:{}: expected 64 grey levels in 0..=16 and a digit in 0..=9, got {} values",
                path.display(),
                number + 1,
                values.len()
            );
        }
        let mut pixels = [0u8; SCAN * SCAN];
        for (pixel, value) in pixels.iter_mut().zip(&values) {
            *pixel = *value as u8;
        }
        scans.pixels.push(pixels);
        scans.digits.push(values[SCAN * SCAN] as u8);
    }
    if scans.digits.len() != SCANS {
        bail!("{}: {} scans, expected scikit-learn's {SCANS}", path.display(), scans.digits.len());
    }
    Ok(scans)
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct DigitsSummary {
    pub images: usize,
    /// Images per domain, in environment order.
    pub per_domain: Vec<(String, usize)>,
}

/// Writes the dataset. `opts.out` must be missing, empty, or an earlier output of this function.
pub fn generate(opts: &DigitsOptions) -> Result<DigitsSummary> {
    if !(8..=256).contains(&opts.image_size) {
        bail!("{}: image size {} is not in 8..=256", opts.kind.name(), opts.image_size);
    }
    let scans = read_scans(&opts.source)?;
    prepare_generated_dir(&opts.out, opts.kind.name(), MARKER_FILE, &opts.kind.domains())?;
    let mut order: Vec<usize> = (0..scans.digits.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_SHUFFLE, opts.seed])));
    let domains = opts.kind.domains();
    let size = opts.image_size as usize;
    let mut summary = DigitsSummary { images: 0, per_domain: Vec::new() };
    for (env, domain) in domains.iter().enumerate() {
        let mut written = 0;
        for &scan in order.iter().skip(env).step_by(domains.len()) {
            let (class, rgb) = match opts.kind {
                DigitsKind::Rotated => {
                    let grey = render(&scans.pixels[scan], size, ROTATIONS[env].1);
                    (scans.digits[scan].to_string(), grey.iter().flat_map(|&g| [g, g, g]).collect::<Vec<u8>>())
                }
                DigitsKind::Colored => {
                    let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_COLOR, opts.seed, scan as u64]));
                    let label = usize::from(scans.digits[scan] >= 5) ^ usize::from(rng.gen_bool(LABEL_NOISE));
                    let green = label ^ usize::from(rng.gen_bool(COLOR_ENVIRONMENTS[env].1));
                    let grey = render(&scans.pixels[scan], size, 0.0);
                    let channel = if green == 1 { 1 } else { 0 };
                    let rgb = grey
                        .iter()
                        .flat_map(|&g| std::array::from_fn::<u8, 3, _>(|c| if c == channel { g } else { 0 }));
                    (BINARY_CLASSES[label].to_string(), rgb.collect())
                }
            };
            let dir = opts.out.join(domain).join(&class);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("{scan:04}.png"));
            let mut png = Vec::new();
            PngEncoder::new(&mut png)
                .write_image(&rgb, opts.image_size, opts.image_size, ExtendedColorType::Rgb8)
                .with_context(|| format!("encoding {}", path.display()))?;
            fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
            written += 1;
        }
        summary.images += written;
        summary.per_domain.push((domain.to_string(), written));
    }
    let marker = opts.out.join(MARKER_FILE);
    let source = opts.source.display();
    fs::write(&marker, format!("mgrun {}: seed {}, {} px, from {source}\n", opts.kind.name(), opts.seed, size))
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(summary)
}

/// The scan upscaled to fill `DIGIT_FRACTION` of a `size` x `size` image (MNIST's 20 px digit in a 28 px
/// frame, so that rotated corners stay inside) and rotated counter-clockwise by `degrees` about the
/// centre: every output pixel samples the scan bilinearly at its pre-image (black outside the scan).
fn render(scan: &[u8; SCAN * SCAN], size: usize, degrees: f32) -> Vec<u8> {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let scale = SCAN as f32 / (size as f32 * DIGIT_FRACTION);
    let centre = size as f32 / 2.0;
    let level = |x: i64, y: i64| -> f32 {
        if (0..SCAN as i64).contains(&x) && (0..SCAN as i64).contains(&y) {
            f32::from(scan[y as usize * SCAN + x as usize])
        } else {
            0.0
        }
    };
    let mut out = vec![0u8; size * size];
    for (index, pixel) in out.iter_mut().enumerate() {
        let (dx, dy) = ((index % size) as f32 + 0.5 - centre, (index / size) as f32 + 0.5 - centre);
        // Rotating the output back by the angle (image y grows downwards) gives the source point.
        let (u, v) = (cos * dx - sin * dy, sin * dx + cos * dy);
        let (x, y) = (u * scale + SCAN as f32 / 2.0 - 0.5, v * scale + SCAN as f32 / 2.0 - 0.5);
        let (x0, y0) = (x.floor(), y.floor());
        let (fx, fy) = (x - x0, y - y0);
        let (x0, y0) = (x0 as i64, y0 as i64);
        let value = level(x0, y0) * (1.0 - fx) * (1.0 - fy)
            + level(x0 + 1, y0) * fx * (1.0 - fy)
            + level(x0, y0 + 1) * (1.0 - fx) * fy
            + level(x0 + 1, y0 + 1) * fx * fy;
        *pixel = (value / SCAN_LEVELS * 255.0).round().clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_render_is_the_scan_centred_and_a_quarter_turn_moves_a_corner() {
        let mut scan = [0u8; 64];
        scan[0] = 16; // the top-left pixel of the scan
        let lit = |image: &[u8]| -> Vec<(usize, usize)> {
            image.iter().enumerate().filter(|(_, &p)| p > 0).map(|(i, _)| (i % 28, i / 28)).collect()
        };
        // Upright: the lit pixels are in the top-left of the 20 px digit box (columns and rows 4-7 of 28).
        let upright = lit(&render(&scan, 28, 0.0));
        assert!(!upright.is_empty() && upright.iter().all(|&(x, y)| x < 8 && y < 8), "{upright:?}");
        assert!(upright.iter().all(|&(x, y)| x >= 3 && y >= 3), "the digit is not centred: {upright:?}");
        // A quarter turn counter-clockwise takes the top-left corner to the bottom-left.
        let turned = lit(&render(&scan, 28, 90.0));
        assert!(!turned.is_empty() && turned.iter().all(|&(x, y)| x < 8 && y >= 20), "{turned:?}");
        // Full levels stay full: 16 of 16 is 255 at the centre of the scan's pixel.
        assert_eq!(render(&[16; 64], 28, 0.0)[14 * 28 + 14], 255);
    }
}
