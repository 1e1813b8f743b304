//! The `[data]` section of a job configuration.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the images are and how they are split, sampled and prepared.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset root: `root/<domain>/<class>/<image>.{jpg,jpeg,png}`.
    pub root: PathBuf,
    /// `"synthetic"` (the tree written by `mgrun datagen synthetic`), `"folder"` (any DomainBed layout) or a
    /// DomainBed dataset: `"pacs"`, `"vlcs"`, `"office_home"`, `"terra_incognita"`, `"domain_net"`.
    #[serde(default = "default_dataset")]
    pub dataset: String,
    /// Domains held out from training (leave-one-domain-out): directory names, DomainBed short names
    /// (`"A"`, `"L100"`, `"clip"`) or environment indices (`0` or `"0"`).
    #[serde(default)]
    #[serde(deserialize_with = "names_or_indices")]
    pub test_domains: Vec<String>,
    /// Images each training domain contributes to one step, over all ranks together.
    #[serde(default = "default_batch_per_domain")]
    pub batch_per_domain: usize,
    /// Images are resized to `image_size x image_size`.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// Fraction of each domain that goes to the "out" (validation) split, in `[0, 1)`.
    #[serde(default = "default_holdout_fraction")]
    pub holdout_fraction: f64,
    /// Seeds the in/out split (DomainBed's `trial_seed` role).
    #[serde(default)]
    pub split_seed: u64,
    /// Decoding threads of the training loader (0 is treated as 1).
    #[serde(default = "default_num_workers")]
    pub num_workers: usize,
    /// Prepared steps the loader may hold ahead of the trainer (0 is treated as 1).
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// DomainBed's training augmentation (RandomResizedCrop 0.7-1.0, flip, ColorJitter 0.3, RandomGrayscale
    /// 0.1), seeded per image; `false` gives training images the evaluation transform.
    #[serde(default = "default_augment")]
    pub augment: bool,
    /// Decoded and resized images are kept in memory when the whole dataset fits in this many MiB
    /// (3 bytes per pixel at `image_size`); 0 turns the cache off.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: usize,
    /// How domains are split into in/out: DomainBed's seeded random split or DomainNet's official lists.
    #[serde(default)]
    pub split: SplitKind,
    /// What to do with images that cannot be decoded.
    #[serde(default)]
    pub on_corrupt: OnCorrupt,
    /// Train on a tree whose domains lack (or have empty) class directories that others have, with a
    /// warning; refused by default, as `mgrun data inspect` reports it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_missing_classes: bool,
}

/// `data.split`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SplitKind {
    /// DomainBed's split: numpy shuffle seeded by `seed_hash(split_seed, env_index)`, first
    /// `int(n * holdout_fraction)` out, the rest in.
    #[default]
    Random,
    /// DomainNet's `<domain>_train.txt` (in) and `<domain>_test.txt` (out) in the dataset root.
    Official,
}

/// `data.on_corrupt`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Fail (listing the first unreadable files) when an image cannot be decoded.
    #[default]
    Error,
    /// Decode every image when the dataset is opened and leave the unreadable ones out of it.
    Skip,
}

fn default_dataset() -> String {
    "synthetic".to_string()
}
fn default_batch_per_domain() -> usize {
    32
}
fn default_image_size() -> i64 {
    224
}
fn default_holdout_fraction() -> f64 {
    0.2
}
fn default_num_workers() -> usize {
    2
}
fn default_prefetch() -> usize {
    4
}
fn default_augment() -> bool {
    true
}
fn default_cache_mb() -> usize {
    1024
}

/// `data.test_domains` entries are names or indices (`["photo"]`, `[1]`, `["1"]`); indices are kept
/// as their text and resolved against the domains when the dataset opens.
fn names_or_indices<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrIndex {
        Name(String),
        Index(u64),
    }
    let entries = Vec::<NameOrIndex>::deserialize(deserializer)?;
    Ok(entries
        .into_iter()
        .map(|e| match e {
            NameOrIndex::Name(name) => name,
            NameOrIndex::Index(index) => index.to_string(),
        })
        .collect())
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            root: PathBuf::from("datasets/synthetic"),
            dataset: default_dataset(),
            test_domains: Vec::new(),
            batch_per_domain: default_batch_per_domain(),
            image_size: default_image_size(),
            holdout_fraction: default_holdout_fraction(),
            split_seed: 0,
            num_workers: default_num_workers(),
            prefetch: default_prefetch(),
            augment: default_augment(),
            cache_mb: default_cache_mb(),
            split: SplitKind::default(),
            on_corrupt: OnCorrupt::default(),
            allow_missing_classes: false,
        }
    }
}

/// Dataset kinds [`crate::Dataset::open`] understands; all of them use the DomainBed folder layout.
pub const KNOWN_DATASETS: &[&str] = &[
    "synthetic",
    "folder",
    "pacs",
    "vlcs",
    "office_home",
    "terra_incognita",
    "domain_net",
    "rotated_digits",
    "colored_digits",
];

impl DataConfig {
    /// Checks the values that do not need the file system.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !KNOWN_DATASETS.contains(&self.dataset.as_str()) {
            anyhow::bail!("data.dataset: unknown dataset '{}' (known: {})", self.dataset, KNOWN_DATASETS.join(", "));
        }
        if self.split == SplitKind::Official && self.dataset != "domain_net" {
            anyhow::bail!("data.split: \"official\" split files exist only for dataset \"domain_net\"");
        }
        if self.batch_per_domain == 0 {
            anyhow::bail!("data.batch_per_domain: must be at least 1");
        }
        if self.image_size <= 0 || self.image_size > 4096 {
            anyhow::bail!("data.image_size: {} is not in 1..=4096", self.image_size);
        }
        if !(0.0..1.0).contains(&self.holdout_fraction) {
            anyhow::bail!("data.holdout_fraction: {} is not in [0, 1)", self.holdout_fraction);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_keys_and_unknown_keys_are_rejected() {
        let cfg: DataConfig = toml_like(r#"{"root": "d"}"#);
        assert_eq!(cfg, DataConfig { root: PathBuf::from("d"), ..DataConfig::default() });
        assert_eq!(cfg.batch_per_domain, 32);
        assert_eq!(cfg.image_size, 224);
        assert!(cfg.augment);
        let err = serde_json::from_str::<DataConfig>(r#"{"root": "d", "batch": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `batch`"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_key() {
        let bad = DataConfig { holdout_fraction: 1.0, ..DataConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("data.holdout_fraction"));
        let bad = DataConfig { dataset: "pacs2".into(), ..DataConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("unknown dataset 'pacs2'"));
        assert!(DataConfig::default().validate().is_ok());
    }

    #[test]
    fn test_domains_take_names_and_indices() {
        let cfg = toml_like(r#"{"root": "d", "test_domains": ["photo", 1]}"#);
        assert_eq!(cfg.test_domains, ["photo", "1"]);
    }

    fn toml_like(json: &str) -> DataConfig {
        serde_json::from_str(json).unwrap()
    }
}
