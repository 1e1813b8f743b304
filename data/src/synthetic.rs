//! A small, learnable multi-domain dataset of real JPEG files in the DomainBed layout
//! (`mgrun datagen synthetic --out DIR`).
//!
//! Classes are shapes; domains are rendering styles with a real domain shift:
//! - `photo`: filled coloured shapes on smooth two-colour gradients with light sensor noise, nearly upright;
//! - `sketch`: dark pencil outlines over light shading on textured white paper, nearly upright;
//! - `noisy`: filled shapes in heavy per-pixel noise with a random palette, nearly upright;
//! - `rotated`: pale shapes on dark backgrounds at any rotation.
//!
//! Every image is a pure function of `(seed, domain, class, index)`, so a seed gives byte-identical files.

use crate::sampler::mix_seed;
use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::ExtendedColorType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::f32::consts::PI;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Shape classes, sorted (their label order).
pub const CLASSES: &[&str] = &["circle", "cross", "ring", "square", "triangle"];
/// Style domains, sorted (their domain order).
pub const DOMAINS: &[&str] = &["noisy", "photo", "rotated", "sketch"];
/// Hidden file marking a directory as written by [`generate`], so it may be regenerated in place.
pub const MARKER_FILE: &str = ".mgrun-synthetic";
const JPEG_QUALITY: u8 = 90;
const STREAM_SYNTHETIC: u64 = 0x5359_4E54_0000_0004;

#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticOptions {
    /// Dataset root to write: `out/<domain>/<class>/<class>_<index>.jpg`.
    pub out: PathBuf,
    pub seed: u64,
    /// Images per class in every domain.
    pub images_per_class: usize,
    /// Width and height in pixels.
    pub image_size: u32,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions { out: PathBuf::from("datasets/synthetic"), seed: 0, images_per_class: 100, image_size: 32 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSummary {
    pub out: PathBuf,
    pub domains: Vec<String>,
    pub classes: Vec<String>,
    /// Files written.
    pub images: usize,
    pub image_size: u32,
    pub bytes: u64,
    pub seconds: f64,
}

impl fmt::Display for SyntheticSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "synthetic dataset: {} JPEG images ({} domains x {} classes, {}x{} px, {:.1} KiB) written to {} in {:.2}s\n  \
             domains: {}\n  classes: {}",
            self.images,
            self.domains.len(),
            self.classes.len(),
            self.image_size,
            self.image_size,
            self.bytes as f64 / 1024.0,
            self.out.display(),
            self.seconds,
            self.domains.join(", "),
            self.classes.join(", ")
        )
    }
}

/// Writes the dataset. `opts.out` must be missing, empty, or an earlier output of this function (whose
/// domain directories are then replaced); anything else is refused rather than overwritten.
pub fn generate(opts: &SyntheticOptions) -> Result<SyntheticSummary> {
    let started = Instant::now();
    if opts.images_per_class == 0 {
        bail!("synthetic: images_per_class must be at least 1");
    }
    if !(8..=1024).contains(&opts.image_size) {
        bail!("synthetic: image_size {} is not in 8..=1024", opts.image_size);
    }
    prepare_generated_dir(&opts.out, "synthetic", MARKER_FILE, DOMAINS)?;
    let size = opts.image_size as usize;
    let mut images = 0;
    let mut bytes = 0u64;
    let mut rgb = vec![0u8; 3 * size * size];
    for (d, domain) in DOMAINS.iter().enumerate() {
        for (c, class) in CLASSES.iter().enumerate() {
            let dir = opts.out.join(domain).join(class);
            fs::create_dir_all(&dir).with_context(|| format!("synthetic: cannot create {}", dir.display()))?;
            for i in 0..opts.images_per_class {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_SYNTHETIC, opts.seed, d as u64, c as u64, i as u64]));
                render(d, c, size, &mut rng, &mut rgb);
                let mut jpeg = Vec::new();
                JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
                    .encode(&rgb, opts.image_size, opts.image_size, ExtendedColorType::Rgb8)
                    .with_context(|| format!("synthetic: encoding {domain}/{class} image {i}"))?;
                let path = dir.join(format!("{class}_{i:04}.jpg"));
                fs::write(&path, &jpeg).with_context(|| format!("synthetic: cannot write {}", path.display()))?;
                images += 1;
                bytes += jpeg.len() as u64;
            }
        }
    }
    let marker = opts.out.join(MARKER_FILE);
    fs::write(
        &marker,
        format!(
            "mgrun synthetic dataset: seed {}, {} images per class, {} px\n",
            opts.seed, opts.images_per_class, opts.image_size
        ),
    )
    .with_context(|| format!("synthetic: cannot write {}", marker.display()))?;
    Ok(SyntheticSummary {
        out: opts.out.clone(),
        domains: DOMAINS.iter().map(|s| s.to_string()).collect(),
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        images,
        image_size: opts.image_size,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Makes `out` ready for `mgrun datagen <name>`: created when missing, kept when empty, and when it holds
/// an earlier output (marked by `marker`) its `domains` directories are removed; anything else is
/// refused rather than overwritten.
pub(crate) fn prepare_generated_dir(out: &Path, name: &str, marker: &str, domains: &[&str]) -> Result<()> {
    if !out.exists() {
        return fs::create_dir_all(out).with_context(|| format!("{name}: cannot create {}", out.display()));
    }
    if !out.is_dir() {
        bail!("{name}: output {} exists and is not a directory", out.display());
    }
    let mut entries = fs::read_dir(out).with_context(|| format!("{name}: cannot list {}", out.display()))?;
    if entries.next().is_none() {
        return Ok(());
    }
    if !out.join(marker).is_file() {
        bail!(
            "{name}: output directory {} is not empty and was not written by `mgrun datagen {name}`; remove it or \
             choose another --out",
            out.display()
        );
    }
    for domain in domains {
        let dir = out.join(domain);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("{name}: cannot remove old {}", dir.display()))?;
        }
    }
    Ok(())
}

/// Signed distance (in units of the shape radius, negative inside) of local point `(u, v)` to shape `class`.
fn shape_distance(class: usize, u: f32, v: f32) -> f32 {
    match CLASSES[class] {
        "circle" => (u * u + v * v).sqrt() - 1.0,
        "cross" => {
            let (au, av) = (u.abs(), v.abs());
            (au - 1.0).max(av - 0.32).min((au - 0.32).max(av - 1.0))
        }
        "ring" => ((u * u + v * v).sqrt() - 0.72).abs() - 0.28,
        "square" => u.abs().max(v.abs()) - 0.8,
        // Equilateral triangle, apex up (image y grows downwards), circumradius 1.1.
        _ => {
            let (s, c) = ((2.0 * PI / 3.0).sin(), (2.0 * PI / 3.0).cos());
            let edges = [(0.0f32, 1.0f32), (s, c), (-s, c)];
            edges.iter().map(|&(nx, ny)| nx * u + ny * v).fold(f32::MIN, f32::max) - 0.55
        }
    }
}

type Rgb = [f32; 3];

fn random_colour(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> Rgb {
    [rng.gen_range(lo..hi), rng.gen_range(lo..hi), rng.gen_range(lo..hi)]
}

/// A colour at least `min_distance` (Euclidean RGB) away from `other`.
fn contrasting_colour(rng: &mut ChaCha8Rng, other: Rgb, min_distance: f32) -> Rgb {
    let mut colour = random_colour(rng, 0.0, 1.0);
    for _ in 0..64 {
        let distance: f32 = colour.iter().zip(other).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        if distance >= min_distance {
            break;
        }
        colour = random_colour(rng, 0.0, 1.0);
    }
    colour
}

fn mix(a: Rgb, b: Rgb, t: f32) -> Rgb {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

/// Approximately standard normal (Irwin-Hall with 4 terms, rescaled).
fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
    let sum: f32 = (0..4).map(|_| rng.gen::<f32>()).sum();
    (sum - 2.0) * 3f32.sqrt()
}

/// Draws one image of class `class` in the style of domain `domain` into `rgb` (HWC bytes).
fn render(domain: usize, class: usize, size: usize, rng: &mut ChaCha8Rng, rgb: &mut [u8]) {
    let s = size as f32;
    let style = DOMAINS[domain];
    let radius = s * rng.gen_range(0.24..0.36);
    let centre = (s * rng.gen_range(0.38..0.62), s * rng.gen_range(0.38..0.62));
    let angle = if style == "rotated" { rng.gen_range(0.0..2.0 * PI) } else { rng.gen_range(-0.25..0.25) };
    let (sin, cos) = angle.sin_cos();

    // Per-style palette and background.
    let (bg_a, bg_b, ink) = match style {
        "photo" => {
            let a = random_colour(rng, 0.1, 0.9);
            let b = random_colour(rng, 0.1, 0.9);
            (a, b, contrasting_colour(rng, mix(a, b, 0.5), 0.6))
        }
        "sketch" => {
            let paper = rng.gen_range(0.86..0.98);
            let ink = rng.gen_range(0.0..0.25);
            ([paper; 3], [paper - 0.06; 3], [ink, ink, ink + rng.gen_range(0.0..0.15)])
        }
        "noisy" => {
            let a = random_colour(rng, 0.0, 1.0);
            (a, a, contrasting_colour(rng, a, 0.55))
        }
        _ => {
            let a = random_colour(rng, 0.0, 0.25);
            (a, random_colour(rng, 0.0, 0.25), random_colour(rng, 0.6, 1.0))
        }
    };
    let gradient_angle = rng.gen_range(0.0..2.0 * PI);
    let (gsin, gcos) = gradient_angle.sin_cos();
    let line_width = rng.gen_range(1.5..2.5);
    let shade = rng.gen_range(0.25..0.45);
    let noise_sigma = match style {
        "noisy" => rng.gen_range(0.04..0.09),
        "photo" => rng.gen_range(0.01..0.04),
        _ => 0.0,
    };
    let texture_phase = rng.gen_range(0.0..2.0 * PI);

    for y in 0..size {
        for x in 0..size {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            // Background: a linear gradient across the image.
            let t = (((px / s - 0.5) * gcos + (py / s - 0.5) * gsin) + 0.5).clamp(0.0, 1.0);
            let mut background = mix(bg_a, bg_b, t);
            if style == "sketch" {
                let grain = 0.03 * ((px * 0.9 + texture_phase).sin() * (py * 1.3 - texture_phase).cos());
                background = background.map(|v| v + grain + 0.02 * gaussian(rng));
            }
            // Shape coverage with one pixel of anti-aliasing; the sketch style draws only the outline.
            let (dx, dy) = ((px - centre.0) / radius, (py - centre.1) / radius);
            let (u, v) = (cos * dx + sin * dy, -sin * dx + cos * dy);
            let distance_px = shape_distance(class, u, v) * radius;
            let coverage = if style == "sketch" {
                // A pencil outline over light shading, so the silhouette survives the change of style.
                let outline = (0.5 * line_width + 0.5 - distance_px.abs()).clamp(0.0, 1.0);
                let shading = shade * (0.5 - distance_px).clamp(0.0, 1.0);
                outline.max(shading)
            } else {
                (0.5 - distance_px).clamp(0.0, 1.0)
            };
            let mut colour = mix(background, ink, coverage);
            if noise_sigma > 0.0 {
                colour = colour.map(|v| v + noise_sigma * gaussian(rng));
            }
            let offset = (y * size + x) * 3;
            for (dst, value) in rgb[offset..offset + 3].iter_mut().zip(colour) {
                *dst = (value.clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
    }
}
