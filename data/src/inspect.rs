//! `mgrun data inspect`: checks a dataset tree before any training, and writes DomainBed's splits.
//!
//! Checks: the domain directories a known dataset needs, per-domain image and class counts against the
//! published ones (warnings: a small or other version of a tree is usable), empty domains and class
//! directories and classes missing from some domains (errors), and every image decoded in parallel threads
//! (unreadable or truncated files are errors with `data.on_corrupt = "error"`, counted and left out with
//! `"skip"`).

use crate::config::{DataConfig, OnCorrupt};
use crate::dataset::{scan_tree, Dataset};
use crate::registry::relative_slash_path;
use anyhow::{Context, Result};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

// Re-exported so the image checks stay reachable where `inspect` users find them.
pub use crate::image_io::{check_image, default_threads, unreadable_images, BadImage};

/// How many unreadable files an error message lists.
const LISTED_BAD_FILES: usize = 10;

/// One domain's counts as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainReport {
    pub name: String,
    /// DomainBed's short name, for known datasets.
    pub short: Option<&'static str>,
    pub images: usize,
    /// Images in the published version, for known datasets.
    pub expected_images: Option<usize>,
    /// Class directories with at least one image.
    pub classes: usize,
}

/// The outcome of [`inspect`].
#[derive(Debug, Clone)]
pub struct InspectReport {
    pub dataset: String,
    pub root: PathBuf,
    pub domains: Vec<DomainReport>,
    /// Sorted union of the class directories.
    pub classes: Vec<String>,
    pub expected_classes: Option<usize>,
    /// Problems that make the tree unusable (or, with `on_corrupt = "error"`, unreadable images).
    pub errors: Vec<String>,
    /// Differences from the published data that still allow training.
    pub warnings: Vec<String>,
    pub unreadable: Vec<BadImage>,
    pub on_corrupt: OnCorrupt,
    pub images_checked: usize,
    pub threads: usize,
    pub decode_seconds: f64,
}

impl InspectReport {
    /// `None` when the tree can be trained on; otherwise the reasons, first unreadable files included.
    pub fn failure(&self) -> Option<String> {
        if self.errors.is_empty() {
            return None;
        }
        Some(format!(
            "data inspect: {} problem(s) in {}:\n  {}",
            self.errors.len(),
            self.root.display(),
            self.errors.join("\n  ")
        ))
    }

    pub fn total_images(&self) -> usize {
        self.domains.iter().map(|d| d.images).sum()
    }
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "dataset {} at {}", self.dataset, self.root.display())?;
        writeln!(
            f,
            "{:>3}  {:<14} {:<6} {:>8} {:>9} {:>8}",
            "env", "domain", "short", "images", "expected", "classes"
        )?;
        for (i, d) in self.domains.iter().enumerate() {
            let expected = d.expected_images.map_or("-".to_string(), |n| n.to_string());
            writeln!(
                f,
                "{i:>3}  {:<14} {:<6} {:>8} {:>9} {:>8}",
                d.name,
                d.short.unwrap_or("-"),
                d.images,
                expected,
                d.classes
            )?;
        }
        let expected_total: Option<usize> = self.domains.iter().map(|d| d.expected_images).sum();
        write!(f, "total {} images, {} classes", self.total_images(), self.classes.len())?;
        if let (Some(images), Some(classes)) = (expected_total, self.expected_classes) {
            write!(f, " (published: {images} images, {classes} classes)")?;
        }
        writeln!(f)?;
        let rate = self.images_checked as f64 / self.decode_seconds.max(1e-9);
        writeln!(
            f,
            "decoded {} images with {} threads in {:.1} s ({rate:.0} img/s): {} unreadable{}",
            self.images_checked,
            self.threads,
            self.decode_seconds,
            self.unreadable.len(),
            match (self.unreadable.is_empty(), self.on_corrupt) {
                (true, _) => "",
                (false, OnCorrupt::Skip) => " (data.on_corrupt = \"skip\": left out of the dataset)",
                (false, OnCorrupt::Error) => " (data.on_corrupt = \"error\")",
            }
        )?;
        for bad in self.unreadable.iter().take(LISTED_BAD_FILES) {
            writeln!(f, "  unreadable: {}: {}", bad.path.display(), bad.reason)?;
        }
        if self.unreadable.len() > LISTED_BAD_FILES {
            writeln!(f, "  ... and {} more", self.unreadable.len() - LISTED_BAD_FILES)?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        for error in &self.errors {
            writeln!(f, "error: {error}")?;
        }
        if self.errors.is_empty() {
            writeln!(f, "ok")?;
        }
        Ok(())
    }
}

/// Checks the tree of `cfg` (see the module doc). Fails only when the root cannot be read; everything
/// else is in the report.
pub fn inspect(cfg: &DataConfig, threads: usize) -> Result<InspectReport> {
    cfg.validate()?;
    let scan = scan_tree(cfg)?;
    let spec = scan.dirs.spec;
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for missing in &scan.dirs.missing {
        errors.push(format!("domain directory {} is missing", scan.dirs.root.join(missing).display()));
    }
    if scan.domains.is_empty() && scan.dirs.missing.is_empty() {
        errors.push(format!(
            "no domain directories in {} (expected <domain>/<class>/<image>.jpg)",
            scan.dirs.root.display()
        ));
    }
    if !scan.dirs.extra.is_empty() {
        warnings.push(format!(
            "ignored director{} {} under the root: not {} domains (DomainBed would make them environments and \
             shift the environment indices of the others)",
            if scan.dirs.extra.len() == 1 { "y" } else { "ies" },
            scan.dirs.extra.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(", "),
            cfg.dataset
        ));
    }

    errors.extend(scan.class_problems());
    let mut domains = Vec::new();
    let mut files = Vec::new();
    for scanned in &scan.domains {
        let domain_spec = spec.and_then(|s| s.domains.iter().find(|d| d.dir == scanned.name));
        let images = scanned.images();
        let dir = scan.dirs.root.join(&scanned.name);
        if images == 0 {
            errors.push(format!("domain {} has no images", dir.display()));
        }
        for (_, class_files) in &scanned.classes {
            files.extend(class_files.iter().cloned());
        }
        if let Some(expected) = domain_spec.map(|d| d.images) {
            if images != expected && images > 0 {
                warnings
                    .push(format!("domain '{}' has {images} images, the published version {expected}", scanned.name));
            }
        }
        let classes = scanned.classes.iter().filter(|(_, f)| !f.is_empty()).count();
        domains.push(DomainReport {
            name: scanned.name.clone(),
            short: domain_spec.map(|d| d.short),
            images,
            expected_images: domain_spec.map(|d| d.images),
            classes,
        });
    }
    if let Some(spec) = spec {
        let total: usize = domains.iter().map(|d| d.images).sum();
        if let Some((_, what)) = spec.other_versions.iter().find(|(n, _)| *n == total) {
            warnings.push(format!("{total} images in total: {what}"));
        } else if total != spec.expected_images() && scan.dirs.missing.is_empty() {
            warnings.push(format!(
                "{total} images in total, the published version has {} (a subset or another version?)",
                spec.expected_images()
            ));
        }
        if scan.classes.len() != spec.num_classes {
            warnings.push(format!("{} classes, the published version has {}", scan.classes.len(), spec.num_classes));
        }
        let unknown: Vec<&String> =
            scan.classes.iter().filter(|c| !spec.classes.is_empty() && !spec.classes.contains(&c.as_str())).collect();
        if !unknown.is_empty() {
            warnings.push(format!(
                "class directories not in {}: {}",
                spec.name,
                unknown.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ")
            ));
        }
    }

    let threads = threads.max(1);
    let started = Instant::now();
    let unreadable = unreadable_images(&files, threads);
    let decode_seconds = started.elapsed().as_secs_f64();
    if cfg.on_corrupt == OnCorrupt::Error && !unreadable.is_empty() {
        let listed: Vec<String> = unreadable
            .iter()
            .take(LISTED_BAD_FILES)
            .map(|b| format!("{} ({})", relative_slash_path(&scan.dirs.root, &b.path), b.reason))
            .collect();
        errors.push(format!(
            "{} unreadable image(s) (set data.on_corrupt = \"skip\" to leave them out): {}{}",
            unreadable.len(),
            listed.join(", "),
            if unreadable.len() > LISTED_BAD_FILES { ", ..." } else { "" }
        ));
    }
    if errors.is_empty() {
        // The rest of Dataset::open's checks (test domains, DomainNet's official lists).
        let known_bad: Vec<PathBuf> = unreadable.iter().map(|b| b.path.clone()).collect();
        if let Err(error) = Dataset::open_excluding(cfg, &known_bad) {
            errors.push(format!("{error:#}"));
        }
    }
    Ok(InspectReport {
        dataset: cfg.dataset.clone(),
        root: scan.dirs.root,
        domains,
        classes: scan.classes,
        expected_classes: spec.map(|s| s.num_classes),
        errors,
        warnings,
        unreadable,
        on_corrupt: cfg.on_corrupt,
        images_checked: files.len(),
        threads,
        decode_seconds,
    })
}

/// `{"<domain>": {"in": [...], "out": [...]}}` with paths relative to the dataset root (`/`-separated), in
/// DomainBed's environment and index order.
pub struct SplitsJson<'a>(pub &'a Dataset);

struct DomainSplits<'a> {
    dataset: &'a Dataset,
    domain: usize,
}

struct PathList<'a> {
    dataset: &'a Dataset,
    domain: usize,
    indices: &'a [usize],
}

impl Serialize for SplitsJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.domains().len()))?;
        for (domain, d) in self.0.domains().iter().enumerate() {
            map.serialize_entry(&d.name, &DomainSplits { dataset: self.0, domain })?;
        }
        map.end()
    }
}

impl Serialize for DomainSplits<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let d = &self.dataset.domains()[self.domain];
        let mut s = serializer.serialize_struct("DomainSplits", 2)?;
        s.serialize_field("in", &PathList { dataset: self.dataset, domain: self.domain, indices: &d.in_split })?;
        s.serialize_field("out", &PathList { dataset: self.dataset, domain: self.domain, indices: &d.out_split })?;
        s.end()
    }
}

impl Serialize for PathList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let files = &self.dataset.domains()[self.domain].files;
        serializer.collect_seq(self.indices.iter().map(|&i| relative_slash_path(self.dataset.root(), &files[i])))
    }
}

/// Writes [`SplitsJson`] of `dataset` to `path`.
pub fn write_splits(dataset: &Dataset, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(&SplitsJson(dataset)).context("serialising the splits")?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing splits file {}", path.display()))
}
