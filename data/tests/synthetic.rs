//! The synthetic dataset generator.

mod common;

use common::config;
use mgrun_data::synthetic::{generate, SyntheticOptions, CLASSES, DOMAINS};
use mgrun_data::{load_eval_batch, Dataset};
use std::fs;
use std::path::Path;

fn all_files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.push((rel, fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generates_a_readable_deterministic_dataset() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let opts = SyntheticOptions { out: a.path().join("synth"), seed: 5, images_per_class: 10, image_size: 32 };
    let summary = generate(&opts).unwrap();
    assert_eq!(summary.images, 4 * 5 * 10);
    assert_eq!(summary.domains, DOMAINS);
    assert_eq!(summary.classes, CLASSES);
    let text = summary.to_string();
    assert!(text.contains("200 JPEG images") && text.contains("noisy, photo, rotated, sketch"), "{text}");

    let ds = Dataset::open(&config(&opts.out, 32)).unwrap();
    assert_eq!(ds.classes(), CLASSES);
    assert_eq!(ds.domains().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), DOMAINS);
    for (d, domain) in ds.domains().iter().enumerate() {
        assert_eq!(domain.len(), 50);
        assert!(domain.files.iter().all(|f| f.extension().unwrap() == "jpg"));
        for class in 0..5i64 {
            assert_eq!(domain.labels.iter().filter(|&&l| l == class).count(), 10);
        }
        // Every file decodes as a 32x32 image.
        let all: Vec<usize> = (0..domain.len()).collect();
        let (x, _) = load_eval_batch(&ds, d, &all, 32).unwrap();
        assert_eq!(x.size(), [50, 3, 32, 32]);
    }

    // Same seed: byte-identical files (the marker included); another seed: different pixels.
    let same = SyntheticOptions { out: b.path().join("synth"), ..opts.clone() };
    generate(&same).unwrap();
    let first = all_files(&opts.out);
    assert_eq!(first.len(), 201, "200 images and the marker file");
    assert!(first == all_files(&same.out), "same seed must give identical bytes");
    let reseeded = SyntheticOptions { out: b.path().join("other"), seed: 6, ..opts.clone() };
    generate(&reseeded).unwrap();
    assert!(first != all_files(&reseeded.out));

    // Regenerating in place replaces an earlier output; foreign directories are refused.
    let smaller = SyntheticOptions { images_per_class: 2, ..opts.clone() };
    assert_eq!(generate(&smaller).unwrap().images, 40);
    assert_eq!(all_files(&opts.out).len(), 41);
    let foreign = b.path().join("foreign");
    fs::create_dir_all(&foreign).unwrap();
    fs::write(foreign.join("keep.txt"), b"user data").unwrap();
    let msg = generate(&SyntheticOptions { out: foreign.clone(), ..opts.clone() }).unwrap_err().to_string();
    assert!(msg.contains("is not empty"), "{msg}");
    assert!(foreign.join("keep.txt").exists());
}

#[test]
fn generation_of_the_default_size_is_fast() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SyntheticOptions { out: dir.path().join("synth"), ..SyntheticOptions::default() };
    let started = std::time::Instant::now();
    let summary = generate(&opts).unwrap();
    assert_eq!(summary.images, 2000);
    // The brief asks for < 10 s; the shared CI machine gets slack only up to that bound.
    assert!(started.elapsed().as_secs_f64() < 10.0, "{summary}");
}
