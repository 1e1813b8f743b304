//! Decoding, resizing and normalising one image.

use crate::transforms::eval_transform;
use anyhow::{Context, Result};
use image::RgbImage;
use std::path::Path;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// ImageNet normalisation, as torchvision's `Normalize` in DomainBed.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// File extensions (lower-cased) that [`crate::Dataset::open`] treats as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// Reads `path` as 8-bit RGB (grayscale, CMYK and alpha are converted like PIL's `convert("RGB")`). JPEGs are
/// decoded by zune-jpeg directly (faster than going through `image`), anything else by the `image` crate.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_rgb_bytes(&bytes).with_context(|| format!("cannot decode image {} (corrupt or unsupported)", path.display()))
}

/// [`decode_rgb`] of an in-memory file.
pub fn decode_rgb_bytes(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        let options = DecoderOptions::default().jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut decoder = JpegDecoder::new_with_options(ZCursor::new(bytes), options);
        let pixels = decoder.decode().map_err(|e| anyhow::anyhow!("JPEG: {e:?}"))?;
        let (width, height) = decoder.dimensions().context("JPEG without dimensions")?;
        if decoder.output_colorspace() == Some(ColorSpace::RGB) {
            let (w, h) = (u32::try_from(width)?, u32::try_from(height)?);
            return RgbImage::from_raw(w, h, pixels).context("JPEG decoder returned a short buffer");
        }
    }
    Ok(image::load_from_memory(bytes)?.into_rgb8())
}

/// Reads `path` and applies the evaluation transform's `Resize((size, size))` (PIL's antialiased bilinear,
/// bit for bit). Returns HWC bytes.
pub fn load_rgb_resized(path: &Path, size: u32) -> Result<Vec<u8>> {
    let source = decode_rgb(path)?;
    Ok(eval_transform(&source, size).into_raw())
}

/// Writes HWC RGB bytes of a `size x size` image into `out` (CHW, length `3 * size * size`) as
/// `(p / 255 - mean) / std` in f32, the same operations as torchvision's `ToTensor` + `Normalize`; mirrored
/// left-right when `flip`.
pub fn normalize_into(rgb: &[u8], size: usize, flip: bool, out: &mut [f32]) {
    let plane = size * size;
    debug_assert_eq!(rgb.len(), 3 * plane);
    debug_assert_eq!(out.len(), 3 * plane);
    for c in 0..3 {
        let (mean, std) = (IMAGENET_MEAN[c], IMAGENET_STD[c]);
        let out_plane = &mut out[c * plane..(c + 1) * plane];
        for y in 0..size {
            let out_row = &mut out_plane[y * size..(y + 1) * size];
            let in_row = &rgb[y * size * 3..(y + 1) * size * 3];
            for (x, dst) in out_row.iter_mut().enumerate() {
                let src_x = if flip { size - 1 - x } else { x };
                *dst = (f32::from(in_row[src_x * 3 + c]) / 255.0 - mean) / std;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_layout_and_flip() {
        // 2x2 image: pixel (y, x) has R = 10 * (2y + x), G = 255, B = 0.
        let mut rgb = Vec::new();
        for i in 0..4u8 {
            rgb.extend_from_slice(&[10 * i, 255, 0]);
        }
        let mut out = vec![0f32; 12];
        normalize_into(&rgb, 2, false, &mut out);
        let r = |p: u8| (f32::from(p) / 255.0 - 0.485) / 0.229;
        assert_eq!(&out[0..4], &[r(0), r(10), r(20), r(30)]);
        assert_eq!(out[4], (1.0 - 0.456) / 0.224);
        assert_eq!(out[8], (0.0 - 0.406) / 0.225);
        normalize_into(&rgb, 2, true, &mut out);
        assert_eq!(&out[0..4], &[r(10), r(0), r(30), r(20)]);
    }
}
