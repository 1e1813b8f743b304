//! Dataset scanning, class map, splits and the error messages of `Dataset::open`.

mod common;

use common::{config, small_synthetic, touch, write_png};
use mgrun_data::{DataConfig, Dataset};
use std::collections::HashSet;

#[test]
fn opens_the_synthetic_tree_with_sorted_domains_classes_and_splits() {
    let dir = small_synthetic(6, 16);
    let cfg = DataConfig { test_domains: vec!["photo".into()], ..config(dir.path(), 16) };
    let ds = Dataset::open(&cfg).unwrap();
    let names: Vec<&str> = ds.domains().iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["noisy", "photo", "rotated", "sketch"]);
    assert_eq!(ds.classes(), ["circle", "cross", "ring", "square", "triangle"]);
    assert_eq!(ds.train_domains(), [0, 2, 3]);
    assert_eq!(ds.test_domains(), [1]);
    assert!(ds.root().is_absolute());
    for domain in ds.domains() {
        assert_eq!(domain.files.len(), 30);
        assert_eq!(domain.labels.len(), 30);
        for (file, &label) in domain.files.iter().zip(&domain.labels) {
            assert!(file.is_absolute() && file.is_file(), "{}", file.display());
            // The label is the class directory the file sits in.
            let class_dir = file.parent().unwrap().file_name().unwrap().to_str().unwrap();
            assert_eq!(ds.classes()[label as usize], class_dir);
        }
        // Files are in ImageFolder order: sorted by class then name.
        let mut sorted = domain.files.clone();
        sorted.sort();
        assert_eq!(domain.files, sorted);
        // 20% of 30 go out; in and out partition the domain.
        assert_eq!(domain.out_split.len(), 6);
        assert_eq!(domain.in_split.len(), 24);
        let all: HashSet<usize> = domain.in_split.iter().chain(&domain.out_split).copied().collect();
        assert_eq!(all, (0..30).collect::<HashSet<_>>());
    }
    // Splits differ between domains and follow split_seed.
    assert_ne!(ds.domains()[0].out_split, ds.domains()[1].out_split);
    let reseeded = Dataset::open(&DataConfig { split_seed: 1, ..cfg.clone() }).unwrap();
    assert_ne!(reseeded.domains()[0].out_split, ds.domains()[0].out_split);
    let again = Dataset::open(&cfg).unwrap();
    assert_eq!(again.domains()[2].in_split, ds.domains()[2].in_split);
}

#[test]
fn one_global_class_map_and_ignored_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_png(&root.join("A/cat/1.png"), 4, 1);
    write_png(&root.join("A/dog/2.PNG"), 4, 2); // extensions are case-insensitive
    write_png(&root.join("A/dog/nested/3.png"), 4, 3); // nested directories inside a class count
    write_png(&root.join("B/dog/4.png"), 4, 4);
    write_png(&root.join("B/zebra/5.png"), 4, 5);
    // Ignored: hidden files and directories, non-images, files at the domain and root level.
    write_png(&root.join("A/cat/.hidden.png"), 4, 6);
    write_png(&root.join("A/.cache/x.png"), 4, 7);
    write_png(&root.join(".trash/cat/x.png"), 4, 8);
    touch(&root.join("A/cat/notes.txt"), b"not an image");
    touch(&root.join("A/readme.png"), b"domain-level file");
    touch(&root.join("labels.csv"), b"root-level file");

    // Domains with different class sets are refused unless asked for (as `data inspect` reports them).
    let msg = open_err(&config(root, 4));
    assert!(msg.contains("domain 'A' lacks class directory 'zebra'") && msg.contains("allow_missing_classes"), "{msg}");
    let ds = Dataset::open(&DataConfig { allow_missing_classes: true, ..config(root, 4) }).unwrap();
    assert_eq!(ds.classes(), ["cat", "dog", "zebra"]);
    let a = &ds.domains()[0];
    let b = &ds.domains()[1];
    assert_eq!((a.name.as_str(), b.name.as_str()), ("A", "B"));
    let file_names = |d: &mgrun_data::Domain| -> Vec<String> {
        d.files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect()
    };
    assert_eq!(file_names(a), ["1.png", "2.PNG", "3.png"]);
    assert_eq!(a.labels, [0, 1, 1]);
    // B has no "cat" folder, yet its "dog" keeps the global label 1 (ImageFolder per domain would shift it).
    assert_eq!(file_names(b), ["4.png", "5.png"]);
    assert_eq!(b.labels, [1, 2]);
}

fn open_err(cfg: &DataConfig) -> String {
    format!("{:#}", Dataset::open(cfg).unwrap_err())
}

#[test]
fn clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let missing = root.join("nope/x");
    let msg = open_err(&config(&missing, 8));
    assert!(msg.contains(&format!("data.root: directory {} does not exist", missing.display())), "{msg}");

    let msg = open_err(&config(root, 8));
    assert!(msg.contains("no domain directories"), "{msg}");

    write_png(&root.join("art/dog/1.png"), 4, 1);
    write_png(&root.join("photo/dog/1.png"), 4, 1);
    let cfg = DataConfig { test_domains: vec!["sketch".into()], ..config(root, 8) };
    let msg = open_err(&cfg);
    assert!(msg.contains("data.test_domains: 'sketch' is not a domain"), "{msg}");
    assert!(msg.contains("available: art, photo"), "{msg}");

    let cfg = DataConfig { test_domains: vec!["art".into(), "photo".into()], ..config(root, 8) };
    let msg = open_err(&cfg);
    assert!(msg.contains("at least one training domain"), "{msg}");

    std::fs::create_dir_all(root.join("cartoon/dog")).unwrap();
    touch(&root.join("cartoon/dog/readme.txt"), b"x");
    let msg = open_err(&config(root, 8));
    assert!(msg.contains("domain 'cartoon'") && msg.contains("has no images"), "{msg}");

    let msg = open_err(&DataConfig { holdout_fraction: 1.5, ..config(root, 8) });
    assert!(msg.contains("data.holdout_fraction"), "{msg}");
}

#[test]
fn cache_is_used_only_when_the_dataset_fits() {
    let dir = small_synthetic(2, 16);
    // 40 images x 3 x 16 x 16 bytes = 30 KiB.
    assert!(Dataset::open(&config(dir.path(), 16)).unwrap().is_cached());
    assert!(!Dataset::open(&DataConfig { cache_mb: 0, ..config(dir.path(), 16) }).unwrap().is_cached());
    // 40 x 3 x 512 x 512 bytes = 30 MiB > 16 MiB.
    assert!(!Dataset::open(&DataConfig { cache_mb: 16, ..config(dir.path(), 512) }).unwrap().is_cached());
}
