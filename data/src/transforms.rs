//! DomainBed's image transforms, reimplemented to give the same uint8 pixels as torchvision on PIL images.
//!
//! Training: `RandomResizedCrop(S, scale=(0.7, 1.0))` -> `RandomHorizontalFlip()` -> `ColorJitter(0.3, 0.3, 0.3,
//! 0.3)` -> `RandomGrayscale(p=0.1)` -> `ToTensor` -> `Normalize(ImageNet)`. Evaluation: `Resize((S, S))` ->
//! `ToTensor` -> `Normalize`. Every step works on 8-bit RGB like PIL does, with PIL's arithmetic (fixed-point
//! antialiased bilinear resampling, float blends truncated to uint8, `L = (19595 R + 38470 G + 7471 B + 2^15) >>
//! 16`, its HSV conversion), so with the same random parameters and the same decoded image the result equals
//! torchvision's bit for bit. Only the parameter *sampling* differs: ours is a pure function of `(seed, domain,
//! step, position)` so that any sharding of a step over ranks draws the same augmentation.

use crate::sampler::mix_seed;
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// ImageNet normalisation, as torchvision's `Normalize` in DomainBed.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Keeps the augmentation stream independent of the sampler's streams for equal integer arguments.
const STREAM_AUGMENT: u64 = 0x4155_474D_0000_0004;

/// DomainBed's `RandomResizedCrop` area range and torchvision's default aspect-ratio range.
pub const CROP_SCALE: (f64, f64) = (0.7, 1.0);
pub const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// `ColorJitter(0.3, 0.3, 0.3, 0.3)`: brightness/contrast/saturation factors in `[0.7, 1.3]`, hue in `[-0.3, 0.3]`.
pub const JITTER: f64 = 0.3;
pub const GRAYSCALE_P: f64 = 0.1;

/// A crop rectangle in source pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

impl CropBox {
    pub fn whole(width: u32, height: u32) -> CropBox {
        CropBox { top: 0, left: 0, height, width }
    }
}

/// One of ColorJitter's four operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Jitter {
    Brightness(f64),
    Contrast(f64),
    Saturation(f64),
    Hue(f64),
}

/// All random choices of the training transform for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct AugmentParams {
    pub crop: CropBox,
    pub flip: bool,
    /// ColorJitter's operations in the (random) order they are applied.
    pub jitter: [Jitter; 4],
    pub grayscale: bool,
}

impl AugmentParams {
    /// The parameters of image `position` (its place in the domain's whole per-step batch) of dataset domain
    /// `domain` at `step`, for a source of `width x height`: a pure function of these integers and `seed`.
    pub fn sample(seed: u64, domain: usize, step: u64, position: usize, width: u32, height: u32) -> AugmentParams {
        let mut rng =
            ChaCha8Rng::seed_from_u64(mix_seed(&[STREAM_AUGMENT, seed, domain as u64, step, position as u64]));
        let crop = random_resized_crop_params(&mut rng, width, height, CROP_SCALE, CROP_RATIO);
        let flip = rng.gen_bool(0.5);
        let (lo, hi) = (1.0 - JITTER, 1.0 + JITTER);
        let mut jitter = [
            Jitter::Brightness(rng.gen_range(lo..hi)),
            Jitter::Contrast(rng.gen_range(lo..hi)),
            Jitter::Saturation(rng.gen_range(lo..hi)),
            Jitter::Hue(rng.gen_range(-JITTER..JITTER)),
        ];
        jitter.shuffle(&mut rng);
        let grayscale = rng.gen_bool(GRAYSCALE_P);
        AugmentParams { crop, flip, jitter, grayscale }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of a random area fraction in `scale` and a
/// log-uniform aspect ratio in `ratio`, then the central crop clamped to `ratio`. Rounds like Python's
/// `round` (half to even).
pub fn random_resized_crop_params<R: Rng>(
    rng: &mut R,
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.gen_range(scale.0..=scale.1);
        let aspect = rng.gen_range(log_lo..=log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return CropBox { top, left, height: h, width: w };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < ratio.0 {
        (width, (f64::from(width) / ratio.0).round_ties_even() as u32)
    } else if in_ratio > ratio.1 {
        ((f64::from(height) * ratio.1).round_ties_even() as u32, height)
    } else {
        (width, height)
    };
    CropBox { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// The training transform's pixels (before `ToTensor`): crop resized to `size x size`, flip, jitter, grayscale.
pub fn train_transform(source: &RgbImage, params: &AugmentParams, size: u32) -> RgbImage {
    let mut img = resized_crop(source, params.crop, size, size);
    if params.flip {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    for op in params.jitter {
        match op {
            Jitter::Brightness(f) => adjust_brightness(&mut img, f),
            Jitter::Contrast(f) => adjust_contrast(&mut img, f),
            Jitter::Saturation(f) => adjust_saturation(&mut img, f),
            Jitter::Hue(f) => adjust_hue(&mut img, f),
        }
    }
    if params.grayscale {
        to_grayscale(&mut img);
    }
    img
}

/// The evaluation transform's pixels: `Resize((size, size))` of the whole image.
pub fn eval_transform(source: &RgbImage, size: u32) -> RgbImage {
    resized_crop(source, CropBox::whole(source.width(), source.height()), size, size)
}

// ---------------------------------------------------------------------------------------------------------
// Resampling: PIL's `Image.crop(box).resize((w, h), BILINEAR)` (libImaging/Resample.c), bit for bit.

/// PIL keeps 8 bits of pixel, 2 of headroom and 22 of fraction in its 32-bit accumulators.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output pixel along one axis: the first input index and the fixed-point weights.
struct AxisCoefficients {
    starts: Vec<usize>,
    counts: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear (triangle) filter over `in_size` inputs
/// mapped onto `out_size` outputs; indices are relative to the start of the cropped range.
fn axis_coefficients(in_size: usize, out_size: usize) -> AxisCoefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the bilinear filter's support is 1
    let ksize = support.ceil() as usize * 2 + 1;
    let mut starts = Vec::with_capacity(out_size);
    let mut counts = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let inv = 1.0 / filter_scale;
        // C's (int) cast truncates toward zero; negative values are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let arg = ((x + xmin) as f64 - center + 0.5) * inv;
            let w = (1.0 - arg.abs()).max(0.0);
            *kx = w;
            total += w;
        }
        for (x, kx) in k.iter().enumerate().take(count) {
            let w = if total != 0.0 { kx / total } else { *kx };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        starts.push(xmin);
        counts.push(count);
    }
    AxisCoefficients { starts, counts, ksize, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// PIL's `img.crop(crop).resize((out_w, out_h), Image.BILINEAR)`: a horizontal pass into an 8-bit
/// intermediate over only the rows the vertical pass reads, then the vertical pass; a pass whose size does not
/// change is skipped, as PIL does.
pub fn resized_crop(source: &RgbImage, crop: CropBox, out_w: u32, out_h: u32) -> RgbImage {
    let src_w = source.width() as usize;
    let src = source.as_raw();
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    debug_assert!(crop.left as usize + cw <= src_w && crop.top as usize + ch <= source.height() as usize);
    let (x0, y0) = (crop.left as usize, crop.top as usize);
    let vertical = axis_coefficients(ch, oh);
    let need_horizontal = cw != ow;
    let need_vertical = ch != oh;

    // Rows of the crop that the vertical pass reads (all of them when it is skipped).
    let (first_row, last_row) = if need_vertical {
        let last = oh - 1;
        (vertical.starts[0], vertical.starts[last] + vertical.counts[last])
    } else {
        (0, ch)
    };
    // The intermediate: `rows` rows of `ow` pixels, the crop's rows `first_row..last_row`.
    let rows = last_row - first_row;
    let mut temp = vec![0u8; rows * ow * 3];
    if need_horizontal {
        let horizontal = axis_coefficients(cw, ow);
        for r in 0..rows {
            let src_row = &src[((y0 + first_row + r) * src_w + x0) * 3..][..cw * 3];
            let out_row = &mut temp[r * ow * 3..][..ow * 3];
            for xx in 0..ow {
                let (start, count) = (horizontal.starts[xx], horizontal.counts[xx]);
                let k = &horizontal.weights[xx * horizontal.ksize..][..count];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &w) in k.iter().enumerate() {
                    let p = &src_row[(start + x) * 3..][..3];
                    acc[0] += i32::from(p[0]) * w;
                    acc[1] += i32::from(p[1]) * w;
                    acc[2] += i32::from(p[2]) * w;
                }
                out_row[xx * 3] = clip8(acc[0]);
                out_row[xx * 3 + 1] = clip8(acc[1]);
                out_row[xx * 3 + 2] = clip8(acc[2]);
            }
        }
    } else {
        for r in 0..rows {
            let src_row = &src[((y0 + first_row + r) * src_w + x0) * 3..][..cw * 3];
            temp[r * ow * 3..][..ow * 3].copy_from_slice(src_row);
        }
    }
    if !need_vertical {
        return RgbImage::from_raw(out_w, out_h, temp).unwrap_or_else(|| unreachable!("buffer sized above"));
    }
    let stride = ow * 3;
    let mut out = vec![0u8; oh * stride];
    let mut acc = vec![0i32; stride];
    for yy in 0..oh {
        let (start, count) = (vertical.starts[yy] - first_row, vertical.counts[yy]);
        let k = &vertical.weights[yy * vertical.ksize..][..count];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (y, &w) in k.iter().enumerate() {
            let row = &temp[(start + y) * stride..][..stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out[yy * stride..][..stride].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage::from_raw(out_w, out_h, out).unwrap_or_else(|| unreachable!("buffer sized above"))
}

// ---------------------------------------------------------------------------------------------------------
// Colour: torchvision's PIL kernels (ImageEnhance and its HSV round trip), with PIL's uint8 arithmetic.

/// PIL's `convert("L")` of one RGB pixel (ITU-R 601-2 luma in 16-bit fixed point).
#[inline]
pub fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
}

/// PIL's `Image.blend(degenerate, img, alpha)` for one channel value: float arithmetic, truncated, clipped.
#[inline]
fn blend(degenerate: u8, value: u8, alpha: f32) -> u8 {
    let d = i32::from(degenerate);
    let t = d as f32 + alpha * (i32::from(value) - d) as f32;
    t.clamp(0.0, 255.0) as u8
}

/// `ImageEnhance.Brightness(img).enhance(factor)`: blend with black.
pub fn adjust_brightness(img: &mut RgbImage, factor: f64) {
    let lut = blend_table(0, factor as f32);
    for v in img.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

/// `blend(degenerate, v, alpha)` for every `v`: brightness and contrast blend with a constant.
fn blend_table(degenerate: u8, alpha: f32) -> [u8; 256] {
    std::array::from_fn(|v| blend(degenerate, v as u8, alpha))
}

/// `ImageEnhance.Contrast(img).enhance(factor)`: blend with the image's mean luma, rounded to an integer.
pub fn adjust_contrast(img: &mut RgbImage, factor: f64) {
    let pixels = img.as_raw().len() / 3;
    if pixels == 0 {
        return;
    }
    let sum: u64 = img.as_raw().chunks_exact(3).map(|p| u64::from(luma(p))).sum();
    let mean = (sum as f64 / pixels as f64 + 0.5) as u8;
    let lut = blend_table(mean, factor as f32);
    for v in img.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

/// `ImageEnhance.Color(img).enhance(factor)`: blend each pixel with its own luma.
pub fn adjust_saturation(img: &mut RgbImage, factor: f64) {
    let alpha = factor as f32;
    for p in img.chunks_exact_mut(3) {
        let gray = luma(p);
        for v in p.iter_mut() {
            *v = blend(gray, *v, alpha);
        }
    }
}

/// torchvision's PIL `adjust_hue`: RGB -> HSV (PIL), `h += int32(factor * 255)` wrapping in uint8, HSV -> RGB.
pub fn adjust_hue(img: &mut RgbImage, factor: f64) {
    let shift = (factor * 255.0) as i32 as u8;
    let tables = HsvTables::get();
    for p in img.chunks_exact_mut(3) {
        // Gray pixels (s = 0) come back unchanged whatever the hue.
        if p[0] == p[1] && p[1] == p[2] {
            continue;
        }
        let [h, s, v] = tables.rgb_to_hsv(p[0], p[1], p[2]);
        let rgb = tables.hsv_to_rgb(h.wrapping_add(shift), s, v);
        p.copy_from_slice(&rgb);
    }
}

/// The divisions of PIL's HSV conversions that depend on one or two bytes only, precomputed (the same
/// float/double operations, so results stay bit-identical; the hue adjustment is several times faster).
struct HsvTables {
    /// `(int)((float)cr / (float)maxc * 255.0)` clipped, at `[maxc][cr]`.
    saturation: Vec<u8>,
    /// `(i, f)` of `hsv2rgb` for each hue byte.
    sector: [(i32, f32); 256],
    /// `fs` of `hsv2rgb` for each saturation byte.
    fs: [f32; 256],
}

impl HsvTables {
    fn get() -> &'static HsvTables {
        static TABLES: std::sync::OnceLock<HsvTables> = std::sync::OnceLock::new();
        TABLES.get_or_init(|| HsvTables {
            saturation: (0..256 * 256)
                .map(|k| {
                    let (maxc, cr) = (k / 256, k % 256);
                    let s = if maxc == 0 { 0.0 } else { cr as f32 / maxc as f32 };
                    (f64::from(s) * 255.0) as i32 as u8
                })
                .collect(),
            sector: std::array::from_fn(|h| {
                let h6 = h as f64 * 6.0 / 255.0;
                let i = h6 as i32;
                (i, (h6 - f64::from(i)) as f32)
            }),
            fs: std::array::from_fn(|s| (s as f64 / 255.0) as f32),
        })
    }

    #[inline]
    fn rgb_to_hsv(&self, r: u8, g: u8, b: u8) -> [u8; 3] {
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        if maxc == minc {
            return [0, 0, maxc];
        }
        let cr_byte = maxc - minc;
        [
            pil_hue(r, g, b, maxc, f32::from(cr_byte)),
            self.saturation[usize::from(maxc) * 256 + usize::from(cr_byte)],
            maxc,
        ]
    }

    #[inline]
    fn hsv_to_rgb(&self, h: u8, s: u8, v: u8) -> [u8; 3] {
        if s == 0 {
            return [v, v, v];
        }
        let (i, f) = self.sector[usize::from(h)];
        let fs = f64::from(self.fs[usize::from(s)]);
        hsv_sector_to_rgb(i, f64::from(f), fs, v)
    }
}

/// The tail of PIL's `hsv2rgb` once `i`, `f` and `fs` are known.
#[inline]
fn hsv_sector_to_rgb(i: i32, f: f64, fs: f64, v: u8) -> [u8; 3] {
    let vf = f64::from(v);
    // C's round() (half away from zero) for x >= 0, without a libm call: x - trunc(x) is exact.
    let clip = |x: f64| {
        let t = x as i32;
        let rounded = if x - f64::from(t) >= 0.5 { t + 1 } else { t };
        rounded.clamp(0, 255) as u8
    };
    let p = clip(vf * (1.0 - fs));
    let q = clip(vf * (1.0 - fs * f));
    let t = clip(vf * (1.0 - fs * (1.0 - f)));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// `to_grayscale(img, num_output_channels=3)`: luma copied to all three channels.
pub fn to_grayscale(img: &mut RgbImage) {
    for p in img.chunks_exact_mut(3) {
        let gray = luma(p);
        p.fill(gray);
    }
}

/// PIL's `rgb2hsv_row` (libImaging/Convert.c), keeping its float/double mix.
pub fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = f32::from(maxc - minc);
    let s = cr / f32::from(maxc);
    [pil_hue(r, g, b, maxc, cr), (f64::from(s) * 255.0) as i32 as u8, maxc]
}

/// The hue byte of PIL's `rgb2hsv_row` for a pixel that is not gray (`cr = max - min > 0`),
/// keeping its float/double mix.
#[inline]
fn pil_hue(r: u8, g: u8, b: u8, maxc: u8, cr: f32) -> u8 {
    // Only the two ratios the branch uses are computed; each is the same f32 division as PIL's.
    let ratio = |c: u8| f32::from(maxc - c) / cr;
    let h: f32 = if r == maxc {
        ratio(b) - ratio(g)
    } else if g == maxc {
        (2.0 + f64::from(ratio(r)) - f64::from(ratio(b))) as f32
    } else {
        (4.0 + f64::from(ratio(g)) - f64::from(ratio(r))) as f32
    };
    // C's fmod(x, 1.0) for x = h / 6 + 1 in [5/6, 11/6]: x - 1 is exact there (Sterbenz), and much cheaper.
    let x = f64::from(h) / 6.0 + 1.0;
    let h = (if x >= 1.0 { x - 1.0 } else { x }) as f32;
    (f64::from(h) * 255.0).clamp(0.0, 255.0) as u8
}

/// PIL's `hsv2rgb` (libImaging/Convert.c).
pub fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let h6 = f64::from(h) * 6.0 / 255.0;
    // h6 >= 0: truncation is floor.
    let i = h6 as i32;
    let f = (h6 - f64::from(i)) as f32;
    let fs = (f64::from(s) / 255.0) as f32;
    hsv_sector_to_rgb(i, f64::from(f), f64::from(fs), v)
}

/// `ToTensor` + `Normalize(ImageNet)`: HWC RGB bytes of an image (an `RgbImage` derefs to them) into CHW
/// f32 `out` of the same length, as `(p / 255 - mean) / std` in f32 like torch.
pub fn normalize_into(rgb: &[u8], out: &mut [f32]) {
    let plane = rgb.len() / 3;
    debug_assert_eq!(out.len(), 3 * plane);
    for c in 0..3 {
        let (mean, std) = (IMAGENET_MEAN[c], IMAGENET_STD[c]);
        for (dst, p) in out[c * plane..(c + 1) * plane].iter_mut().zip(rgb.chunks_exact(3)) {
            *dst = (f32::from(p[c]) / 255.0 - mean) / std;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_writes_planes_in_row_order() {
        // 2x2 image: pixel (y, x) has R = 10 * (2y + x), G = 255, B = 0.
        let mut rgb = Vec::new();
        for i in 0..4u8 {
            rgb.extend_from_slice(&[10 * i, 255, 0]);
        }
        let mut out = vec![0f32; 12];
        normalize_into(&rgb, &mut out);
        let r = |p: u8| (f32::from(p) / 255.0 - 0.485) / 0.229;
        assert_eq!(&out[0..4], &[r(0), r(10), r(20), r(30)]);
        assert_eq!(out[4], (1.0 - 0.456) / 0.224);
        assert_eq!(out[8], (0.0 - 0.406) / 0.225);
    }

    #[test]
    fn crop_params_stay_inside_and_follow_scale_and_ratio() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (w, h) in [(224, 224), (500, 375), (227, 227), (30, 300)] {
            for _ in 0..500 {
                let c = random_resized_crop_params(&mut rng, w, h, CROP_SCALE, CROP_RATIO);
                assert!(c.left + c.width <= w && c.top + c.height <= h, "{c:?} in {w}x{h}");
                let frac = f64::from(c.width * c.height) / f64::from(w * h);
                if w != 30 {
                    assert!((0.68..=1.0).contains(&frac), "{c:?} covers {frac} of {w}x{h}");
                }
            }
        }
        // A 30x300 strip never fits ratio >= 3/4 at 70% of its area: the fallback crop is 30 x round(30 / 0.75).
        let c = random_resized_crop_params(&mut rng, 30, 300, CROP_SCALE, CROP_RATIO);
        assert_eq!(c, CropBox { top: 130, left: 0, height: 40, width: 30 });
    }

    #[test]
    fn identity_resize_copies_and_constant_images_stay_constant() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resized_crop(&img, CropBox::whole(7, 5), 7, 5), img);
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([17, 200, 255]));
        let out = resized_crop(&flat, CropBox { top: 3, left: 5, height: 19, width: 30 }, 11, 13);
        assert!(out.pixels().all(|p| p.0 == [17, 200, 255]));
    }

    #[test]
    fn hsv_round_trip_of_pure_colours() {
        assert_eq!(rgb_to_hsv(255, 0, 0), [0, 255, 255]);
        assert_eq!(hsv_to_rgb(0, 255, 255), [255, 0, 0]);
        assert_eq!(rgb_to_hsv(10, 10, 10), [0, 0, 10]);
        assert_eq!(hsv_to_rgb(0, 255, 255), [255, 0, 0]);
    }

    #[test]
    fn hsv_tables_equal_the_direct_conversions() {
        let tables = HsvTables::get();
        for r in (0..=255u8).step_by(3) {
            for g in (0..=255u8).step_by(5) {
                for b in (0..=255u8).step_by(7) {
                    assert_eq!(tables.rgb_to_hsv(r, g, b), rgb_to_hsv(r, g, b), "{r} {g} {b}");
                }
            }
        }
        for h in 0..=255u8 {
            for s in 0..=255u8 {
                for v in [0, 1, 77, 128, 254, 255] {
                    assert_eq!(tables.hsv_to_rgb(h, s, v), hsv_to_rgb(h, s, v), "{h} {s} {v}");
                }
            }
        }
    }

    #[test]
    fn augment_params_are_a_function_of_their_integers() {
        let a = AugmentParams::sample(1, 2, 3, 4, 300, 200);
        assert_eq!(a, AugmentParams::sample(1, 2, 3, 4, 300, 200));
        assert_ne!(a, AugmentParams::sample(1, 2, 3, 5, 300, 200));
        let grays = (0..2000).filter(|&p| AugmentParams::sample(0, 0, 0, p, 64, 64).grayscale).count();
        assert!((140..260).contains(&grays), "{grays} grayscale of 2000");
    }
}
