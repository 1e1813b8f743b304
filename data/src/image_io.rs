//! Decoding images: for training and evaluation (through the evaluation resize), and checking that files
//! decode at all (`data.on_corrupt`, `mgrun data inspect`).

use crate::transforms::eval_transform;
use anyhow::{Context, Result};
use image::{ImageReader, RgbImage};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

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

/// An image that could not be decoded, with the decoder's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadImage {
    pub path: PathBuf,
    pub reason: String,
}

/// Threads for decoding checks: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fully decodes `path` (format recognised by content); a truncated JPEG or PNG fails.
pub fn check_image(path: &Path) -> std::result::Result<(), String> {
    let reader = ImageReader::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let reader = reader.with_guessed_format().map_err(|e| format!("cannot read: {e}"))?;
    if reader.format().is_none() {
        return Err("not a JPEG or PNG file".to_string());
    }
    let image = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    if image.width() == 0 || image.height() == 0 {
        return Err("empty image".to_string());
    }
    Ok(())
}

/// The files of `files` that [`check_image`] rejects, in input order; `threads` decode in parallel.
pub fn unreadable_images(files: &[PathBuf], threads: usize) -> Vec<BadImage> {
    let next = AtomicUsize::new(0);
    let bad = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, files.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = files.get(i) else { break };
                if let Err(reason) = check_image(path) {
                    // A poisoned lock only means another checker panicked; its list is still valid.
                    bad.lock().unwrap_or_else(|p| p.into_inner()).push((i, BadImage { path: path.clone(), reason }));
                }
            });
        }
    });
    let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    bad.sort_by_key(|(i, _)| *i);
    bad.into_iter().map(|(_, b)| b).collect()
}
