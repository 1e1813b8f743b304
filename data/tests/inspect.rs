//! `inspect` and the known datasets on small generated trees: layout, domain order, short names, counts,
//! missing/empty domains and classes, unreadable and truncated images, `on_corrupt`, DomainNet's official
//! split files.

use mgrun_data::inspect::{inspect, unreadable_images};
use mgrun_data::registry::{spec, write_sample_tree, SampleTreeOptions, DATASETS};
use mgrun_data::{DataConfig, Dataset, OnCorrupt, SplitKind};
use std::fs;
use std::path::Path;

fn sample(dataset: &str, root: &Path, classes: usize, images_per_class: usize) -> DataConfig {
    let options = SampleTreeOptions { out: root.to_path_buf(), classes, images_per_class, image_size: 12 };
    write_sample_tree(spec(dataset).unwrap(), &options).unwrap();
    DataConfig { root: root.to_path_buf(), dataset: dataset.into(), image_size: 12, ..DataConfig::default() }
}

#[test]
fn every_known_dataset_opens_in_domainbed_order_and_inspects_clean() {
    for spec in DATASETS {
        let dir = tempfile::tempdir().unwrap();
        let cfg = sample(spec.name, dir.path(), 2, 5);
        let report = inspect(&cfg, 2).unwrap();
        assert!(report.failure().is_none(), "{}: {report}", spec.name);
        assert_eq!(report.images_checked, spec.domains.len() * 10);
        // A subset tree: counts differ from the published ones, which is a warning only.
        assert!(report.warnings.iter().any(|w| w.contains("published version has")), "{report}");
        let text = report.to_string();
        assert!(text.contains(spec.domains[0].short) && text.contains("ok"), "{text}");

        let last = spec.domains.last().unwrap();
        let by_short = DataConfig { test_domains: vec![last.short.to_lowercase()], ..cfg.clone() };
        let ds = Dataset::open(&by_short).unwrap();
        let names: Vec<&str> = ds.domains().iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, spec.domain_dirs());
        assert_eq!(ds.test_domains(), [spec.domains.len() - 1]);
        let by_index = DataConfig { test_domains: vec!["1".into()], ..cfg.clone() };
        assert_eq!(Dataset::open(&by_index).unwrap().test_domains(), [1]);
        let by_dir = DataConfig { test_domains: vec![spec.domains[0].dir.into()], ..cfg };
        assert_eq!(Dataset::open(&by_dir).unwrap().test_domains(), [0]);
    }
}

#[test]
fn missing_domain_and_empty_or_missing_classes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sample("pacs", dir.path(), 3, 2);
    fs::remove_dir_all(dir.path().join("cartoon")).unwrap();
    fs::create_dir_all(dir.path().join("extra_dir/dog")).unwrap();
    let err = format!("{:#}", Dataset::open(&cfg).unwrap_err());
    assert!(err.contains("missing the pacs domain directory 'cartoon'"), "{err}");
    let report = inspect(&cfg, 2).unwrap();
    let failure = report.failure().unwrap();
    assert!(failure.contains("cartoon is missing"), "{failure}");
    assert!(report.warnings.iter().any(|w| w.contains("'extra_dir'")), "{report}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = sample("vlcs", dir.path(), 3, 2);
    // An empty class directory, and a class that one domain lacks.
    for file in fs::read_dir(dir.path().join("SUN09/car")).unwrap() {
        fs::remove_file(file.unwrap().path()).unwrap();
    }
    fs::remove_dir_all(dir.path().join("LabelMe/chair")).unwrap();
    let failure = inspect(&cfg, 2).unwrap().failure().unwrap();
    assert!(failure.contains("SUN09/car has no images"), "{failure}");
    assert!(failure.contains("domain 'LabelMe' lacks class directory 'chair'"), "{failure}");
}

#[test]
fn unreadable_and_truncated_images_fail_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sample("terra_incognita", dir.path(), 2, 4);
    let class_dir = dir.path().join("location_38/bird");
    let good: Vec<_> = {
        let mut files: Vec<_> = fs::read_dir(&class_dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    };
    // Truncate a JPEG to half, and replace a PNG by text.
    let jpeg = good.iter().find(|p| p.extension().unwrap() == "jpg").unwrap().clone();
    let bytes = fs::read(&jpeg).unwrap();
    fs::write(&jpeg, &bytes[..bytes.len() / 2]).unwrap();
    let png = good.iter().find(|p| p.extension().unwrap() == "png").unwrap().clone();
    fs::write(&png, b"not an image at all").unwrap();
    let bad = unreadable_images(&good, 3);
    let bad_paths: Vec<_> = bad.iter().map(|b| b.path.clone()).collect();
    let mut expected = vec![jpeg.clone(), png.clone()];
    expected.sort();
    assert_eq!(bad_paths, expected, "{bad:?}");

    let failure = inspect(&cfg, 2).unwrap().failure().unwrap();
    assert!(failure.contains("2 unreadable image(s)") && failure.contains("location_38/bird/"), "{failure}");

    let skip = DataConfig { on_corrupt: OnCorrupt::Skip, ..cfg.clone() };
    let report = inspect(&skip, 2).unwrap();
    assert!(report.failure().is_none(), "{report}");
    assert_eq!(report.unreadable.len(), 2);
    let ds = Dataset::open(&skip).unwrap();
    assert_eq!(ds.skipped().len(), 2);
    let domain = &ds.domains()[ds.domain_index("location_38").unwrap()];
    assert_eq!(domain.len(), 6, "two of eight images left out");
    assert!(!domain.files.contains(&jpeg) && !domain.files.contains(&png));
    // Without skip the dataset still opens (images are decoded lazily) and keeps all eight.
    assert_eq!(Dataset::open(&cfg).unwrap().domains()[1].len(), 8);
}

#[test]
fn domain_net_official_split_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DataConfig { split: SplitKind::Official, ..sample("domain_net", dir.path(), 2, 10) };
    let ds = Dataset::open(&cfg).unwrap();
    for domain in ds.domains() {
        let listed = |suffix: &str| -> Vec<String> {
            let text = fs::read_to_string(dir.path().join(format!("{}_{suffix}.txt", domain.name))).unwrap();
            text.lines().map(|l| l.split(' ').next().unwrap().to_string()).collect()
        };
        let paths = |split: &[usize]| -> Vec<String> {
            split.iter().map(|&i| mgrun_data::registry::relative_slash_path(ds.root(), &domain.files[i])).collect()
        };
        assert_eq!(paths(&domain.in_split), listed("train"), "{}", domain.name);
        assert_eq!(paths(&domain.out_split), listed("test"), "{}", domain.name);
        assert_eq!(domain.in_split.len(), 14);
    }
    // A listed file that is not there is named with the list file and line.
    fs::write(dir.path().join("painting_test.txt"), "painting/class_000/nope.jpg 0\n").unwrap();
    let err = format!("{:#}", Dataset::open(&cfg).unwrap_err());
    assert!(err.contains("painting_test.txt:1: painting/class_000/nope.jpg"), "{err}");
    // The official split exists only for DomainNet.
    let bad = DataConfig { dataset: "pacs".into(), ..cfg };
    assert!(format!("{:#}", Dataset::open(&bad).unwrap_err()).contains("data.split"));
}
