//! Helpers shared by the data crate's integration tests.
#![allow(dead_code)]

use mgrun_data::synthetic::{generate, SyntheticOptions};
use mgrun_data::DataConfig;
use std::fs;
use std::path::{Path, PathBuf};

/// A small synthetic dataset (4 domains x 5 classes x `per_class` images of `size` px) in a fresh tempdir.
pub fn small_synthetic(per_class: usize, size: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let opts =
        SyntheticOptions { out: dir.path().to_path_buf(), seed: 3, images_per_class: per_class, image_size: size };
    generate(&opts).unwrap();
    dir
}

pub fn config(root: &Path, image_size: i64) -> DataConfig {
    DataConfig { root: root.to_path_buf(), image_size, ..DataConfig::default() }
}

/// Writes a `size x size` RGB PNG whose pixels depend on `seed`.
pub fn write_png(path: &Path, size: u32, seed: u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        image::Rgb([(x * 13 + y * 7) as u8 ^ seed, (x * 3 + y * 29) as u8, seed.wrapping_mul(31) ^ (x * y) as u8])
    });
    img.save(path).unwrap();
}

pub fn touch(path: &Path, contents: &[u8]) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, contents).unwrap();
    path.to_path_buf()
}
