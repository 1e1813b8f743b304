//! The five DomainBed image datasets: directory names, domain (environment) order, short names, classes and
//! the image counts `mgrun data inspect` expects (DomainBed commit 7df6f06, `domainbed/datasets.py`).
//!
//! `data.root` is the dataset's own directory (DomainBed's `<data_dir>/PACS/`), whose subdirectories are the
//! domains. DomainBed numbers environments by the sorted directory names; the lists below are in that order,
//! so a domain's position is its DomainBed environment index (the `env_i` of the split seed).

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// One domain of a known dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainSpec {
    /// Directory name under the dataset root.
    pub dir: &'static str,
    /// DomainBed's `ENVIRONMENTS` entry (table headers), also accepted in `data.test_domains`.
    pub short: &'static str,
    /// Images in the version behind DomainBed's published tables.
    pub images: usize,
}

/// A known dataset: layout and expected counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetSpec {
    /// The `data.dataset` value.
    pub name: &'static str,
    /// The directory DomainBed's download script creates under its data dir.
    pub domainbed_dir: &'static str,
    pub domains: &'static [DomainSpec],
    pub num_classes: usize,
    /// Class directory names (sorted) where the list is short enough to check by name; empty otherwise.
    pub classes: &'static [&'static str],
    /// Other known versions of the data, by total image count, with what they are.
    pub other_versions: &'static [(usize, &'static str)],
    /// DomainBed's `CHECKPOINT_FREQ`.
    pub checkpoint_freq: usize,
}

impl DatasetSpec {
    /// Total images of the published version.
    pub fn expected_images(&self) -> usize {
        self.domains.iter().map(|d| d.images).sum()
    }

    /// The domain directory names in DomainBed's environment order.
    pub fn domain_dirs(&self) -> Vec<&'static str> {
        self.domains.iter().map(|d| d.dir).collect()
    }
}

const fn domain(dir: &'static str, short: &'static str, images: usize) -> DomainSpec {
    DomainSpec { dir, short, images }
}

/// A dataset with the common settings: no other known versions, a checkpoint every 300 steps.
const fn dataset(
    name: &'static str,
    domainbed_dir: &'static str,
    domains: &'static [DomainSpec],
    num_classes: usize,
    classes: &'static [&'static str],
) -> DatasetSpec {
    DatasetSpec { name, domainbed_dir, domains, num_classes, classes, other_versions: &[], checkpoint_freq: 300 }
}

/// Every known dataset.
pub const DATASETS: &[DatasetSpec] = &[
    dataset(
        "pacs",
        "PACS",
        &[
            domain("art_painting", "A", 2048),
            domain("cartoon", "C", 2344),
            domain("photo", "P", 1670),
            domain("sketch", "S", 3929),
        ],
        7,
        &["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"],
    ),
    dataset(
        "vlcs",
        "VLCS",
        &[
            domain("Caltech101", "C", 1415),
            domain("LabelMe", "L", 2656),
            domain("SUN09", "S", 3282),
            domain("VOC2007", "V", 3376),
        ],
        5,
        &["bird", "car", "chair", "dog", "person"],
    ),
    dataset(
        "office_home",
        "office_home",
        &[
            domain("Art", "A", 2427),
            domain("Clipart", "C", 4365),
            domain("Product", "P", 4439),
            domain("Real World", "R", 4357),
        ],
        65,
        &[],
    ),
    DatasetSpec {
        other_versions: &[(
            24_330,
            "the 2021 download script's version (caltech_images_20210113.json); the published tables used \
             24,788 images, so results are not directly comparable",
        )],
        ..dataset(
            "terra_incognita",
            "terra_incognita",
            &[
                domain("location_100", "L100", 4879),
                domain("location_38", "L38", 9767),
                domain("location_43", "L43", 4020),
                domain("location_46", "L46", 6122),
            ],
            10,
            &["bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"],
        )
    },
    DatasetSpec {
        checkpoint_freq: 1000,
        ..dataset(
            "domain_net",
            "domain_net",
            // Counts after DomainBed deletes misc/domain_net_duplicates.txt.
            &[
                domain("clipart", "clip", 48_129),
                domain("infograph", "info", 51_605),
                domain("painting", "paint", 72_266),
                domain("quickdraw", "quick", 172_500),
                domain("real", "real", 172_947),
                domain("sketch", "sketch", 69_128),
            ],
            345,
            &[],
        )
    },
    // Offline datasets made from scikit-learn's digits by `mgrun datagen` (see `crate::digits`): not
    // DomainBed's, named after its RotatedMNIST and ColoredMNIST; the counts are the 1,797 scans dealt out
    // to the domains.
    DatasetSpec {
        checkpoint_freq: 100,
        ..dataset(
            "rotated_digits",
            "rotated_digits",
            &[
                domain("rot0", "0", 300),
                domain("rot15", "15", 300),
                domain("rot30", "30", 300),
                domain("rot45", "45", 299),
                domain("rot60", "60", 299),
                domain("rot75", "75", 299),
            ],
            10,
            &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
        )
    },
    DatasetSpec {
        checkpoint_freq: 100,
        ..dataset(
            "colored_digits",
            "colored_digits",
            &[domain("plus90", "+90%", 599), domain("plus80", "+80%", 599), domain("minus90", "-90%", 599)],
            2,
            &["digit_0_4", "digit_5_9"],
        )
    },
];

/// The spec of `data.dataset = name`; `None` for `synthetic`, `folder` and unknown names.
pub fn spec(name: &str) -> Option<&'static DatasetSpec> {
    DATASETS.iter().find(|d| d.name == name)
}

/// How [`write_sample_tree`] fills a small tree in a dataset's layout.
#[derive(Debug, Clone)]
pub struct SampleTreeOptions {
    pub out: PathBuf,
    /// Classes per domain: the first `classes` of the spec's list (or generated names), at most the real count.
    pub classes: usize,
    pub images_per_class: usize,
    pub image_size: u32,
}

/// Writes a small tree in `spec`'s layout for tests and demos: every domain, `classes` class directories,
/// `images_per_class` images each (JPEG, every third one PNG), with a class-dependent colour so that a model
/// can learn something. For DomainNet it also writes official-style `<domain>_train.txt`/`<domain>_test.txt`
/// lists (about 70/30). Returns the number of images written.
pub fn write_sample_tree(spec: &DatasetSpec, options: &SampleTreeOptions) -> Result<usize> {
    if options.classes == 0 || options.images_per_class == 0 || options.image_size < 4 {
        bail!("a sample tree needs at least 1 class, 1 image per class and 4 px images");
    }
    let class_count = options.classes.min(spec.num_classes);
    let classes: Vec<String> = if spec.classes.is_empty() {
        (0..class_count).map(|c| format!("class_{c:03}")).collect()
    } else {
        spec.classes[..class_count].iter().map(|c| c.to_string()).collect()
    };
    let mut written = 0;
    for (domain_index, domain) in spec.domains.iter().enumerate() {
        let mut lists = (String::new(), String::new());
        for (label, class) in classes.iter().enumerate() {
            let dir = options.out.join(domain.dir).join(class);
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for image in 0..options.images_per_class {
                let extension = if image % 3 == 2 { "png" } else { "jpg" };
                let file = format!("{}_{label:03}_{image:04}.{extension}", domain.short);
                let path = dir.join(&file);
                sample_image(label, domain_index, image, options.image_size)
                    .save(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                let line = format!("{}/{class}/{file} {label}\n", domain.dir);
                if image % 10 < 7 {
                    lists.0.push_str(&line);
                } else {
                    lists.1.push_str(&line);
                }
                written += 1;
            }
        }
        if spec.name == "domain_net" {
            for (suffix, text) in [("train", &lists.0), ("test", &lists.1)] {
                let path = options.out.join(format!("{}_{suffix}.txt", domain.dir));
                fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(written)
}

/// A class-coloured image with a domain-dependent stripe pattern and per-image noise.
fn sample_image(label: usize, domain: usize, image: usize, size: u32) -> image::RgbImage {
    let hue = (label * 67 % 256) as u32;
    image::RgbImage::from_fn(size, size, |x, y| {
        let stripe = if ((x + y * (domain as u32 + 1)) / 3).is_multiple_of(2) { 40 } else { 0 };
        let noise = (x * 31 + y * 17 + image as u32 * 13) % 23;
        image::Rgb([
            ((hue + stripe + noise) % 256) as u8,
            ((255 - hue + noise) % 256) as u8,
            ((hue * 3 + stripe) % 256) as u8,
        ])
    })
}

/// A path below `root` written with `/` separators (the form of split files and DomainNet's lists).
pub fn relative_slash_path(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_in_sorted_directory_order_and_totals_match_the_protocol() {
        for spec in DATASETS {
            let dirs = spec.domain_dirs();
            let mut sorted = dirs.clone();
            sorted.sort();
            // The digits datasets keep their generator's environment order (+90%, +80%, -90% for the
            // colours), as DomainBed's MNIST datasets do, which have no directories to sort.
            if !["rotated_digits", "colored_digits"].contains(&spec.name) {
                assert_eq!(dirs, sorted, "{}: DomainBed numbers environments by sorted directory name", spec.name);
            }
            let mut classes = spec.classes.to_vec();
            classes.sort();
            assert_eq!(classes, spec.classes, "{}", spec.name);
            assert!(spec.classes.is_empty() || spec.classes.len() == spec.num_classes);
        }
        let totals: Vec<usize> = DATASETS.iter().map(DatasetSpec::expected_images).collect();
        assert_eq!(totals, [9_991, 10_729, 15_588, 24_788, 586_575, 1_797, 1_797]);
        assert_eq!(spec("terra_incognita").map(|s| s.domains[0].short), Some("L100"));
        assert!(spec("folder").is_none());
    }
}
