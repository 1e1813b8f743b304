//! Scanning a DomainBed-layout dataset tree: domains, one global class list, labels, in/out splits.

use crate::config::DataConfig;
use crate::image_io::{load_rgb_resized, IMAGE_EXTENSIONS};
use crate::split::split_in_out;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// One domain (environment): every image of `root/<name>/<class>/...`.
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    /// Absolute paths (the dataset root is canonicalised), ordered like torchvision's `ImageFolder`:
    /// by class name, then by directory and file name inside a class.
    pub files: Vec<PathBuf>,
    /// Index into [`Dataset::classes`] of each file.
    pub labels: Vec<i64>,
    /// Indices into `files` of the training ("in") and held-out ("out") split, in shuffled order.
    pub in_split: Vec<usize>,
    pub out_split: Vec<usize>,
}

impl Domain {
    pub fn len(&self) -> usize {
        self.files.len()
    }
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// A scanned dataset tree plus, when it is small enough, an in-memory cache of decoded images.
#[derive(Debug)]
pub struct Dataset {
    root: PathBuf,
    classes: Vec<String>,
    domains: Vec<Domain>,
    train_domains: Vec<usize>,
    test_domains: Vec<usize>,
    cache: Option<ImageCache>,
}

/// Decoded and resized RGB bytes of every image at one size, filled on first use.
#[derive(Debug)]
struct ImageCache {
    image_size: u32,
    slots: Vec<Vec<OnceLock<Arc<[u8]>>>>,
}

impl Dataset {
    /// Scans `cfg.root`. Domains are the sorted non-hidden subdirectories of the root, classes the union
    /// of the non-hidden subdirectories of the domains (sorted), images every non-hidden
    /// `.jpg`/`.jpeg`/`.png` file (any case) below a class directory; other files are ignored.
    pub fn open(cfg: &DataConfig) -> Result<Dataset> {
        cfg.validate()?;
        if !cfg.root.exists() {
            bail!("data.root: directory {} does not exist", cfg.root.display());
        }
        if !cfg.root.is_dir() {
            bail!("data.root: {} is not a directory", cfg.root.display());
        }
        let root = cfg
            .root
            .canonicalize()
            .with_context(|| format!("data.root: cannot resolve directory {}", cfg.root.display()))?;

        let domain_names = visible_subdirectories(&root)?;
        if domain_names.is_empty() {
            bail!(
                "data.root: no domain directories in {} (expected {}/<domain>/<class>/<image>.jpg)",
                root.display(),
                root.display()
            );
        }
        let mut class_dirs_per_domain = Vec::with_capacity(domain_names.len());
        let mut all_classes = BTreeSet::new();
        for name in &domain_names {
            let classes = visible_subdirectories(&root.join(name))?;
            all_classes.extend(classes.iter().cloned());
            class_dirs_per_domain.push(classes);
        }
        let classes: Vec<String> = all_classes.into_iter().collect();

        let mut domains = Vec::with_capacity(domain_names.len());
        for (index, (name, class_dirs)) in domain_names.iter().zip(&class_dirs_per_domain).enumerate() {
            let domain_dir = root.join(name);
            let mut files = Vec::new();
            let mut labels = Vec::new();
            for class in class_dirs {
                // `classes` is the sorted union of every domain's class directories, so the search succeeds.
                let label = classes.binary_search(class).unwrap_or_default() as i64;
                let images = image_files_below(&domain_dir.join(class))?;
                labels.extend(std::iter::repeat_n(label, images.len()));
                files.extend(images);
            }
            if files.is_empty() {
                bail!(
                    "domain '{name}' ({}) has no images: expected {}/<class>/<image>.{{{}}}",
                    domain_dir.display(),
                    domain_dir.display(),
                    IMAGE_EXTENSIONS.join(",")
                );
            }
            let (in_split, out_split) = split_in_out(files.len(), cfg.holdout_fraction, cfg.split_seed, index);
            domains.push(Domain { name: name.clone(), files, labels, in_split, out_split });
        }

        let mut test_domains = Vec::new();
        for wanted in &cfg.test_domains {
            match domains.iter().position(|d| &d.name == wanted) {
                Some(i) if !test_domains.contains(&i) => test_domains.push(i),
                Some(_) => {}
                None => bail!(
                    "data.test_domains: '{wanted}' is not a domain of {} (available: {})",
                    root.display(),
                    domain_names.join(", ")
                ),
            }
        }
        test_domains.sort_unstable();
        let train_domains: Vec<usize> = (0..domains.len()).filter(|i| !test_domains.contains(i)).collect();
        if train_domains.is_empty() {
            bail!(
                "data.test_domains: all {} domains ({}) are held out; at least one training domain is needed",
                domains.len(),
                domain_names.join(", ")
            );
        }

        let cache = ImageCache::if_fits(&domains, cfg.image_size, cfg.cache_mb);
        Ok(Dataset { root, classes, domains, train_domains, test_domains, cache })
    }

    /// One global, sorted class list (the union over domains); labels index into it.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Every domain, sorted by name.
    pub fn domains(&self) -> &[Domain] {
        &self.domains
    }

    /// Indices into [`Dataset::domains`] of the domains not named in `test_domains`, ascending.
    pub fn train_domains(&self) -> &[usize] {
        &self.train_domains
    }

    /// Indices into [`Dataset::domains`] of the held-out domains, ascending.
    pub fn test_domains(&self) -> &[usize] {
        &self.test_domains
    }

    /// The canonical (absolute) dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Index of the domain called `name`.
    pub fn domain_index(&self, name: &str) -> Option<usize> {
        self.domains.iter().position(|d| d.name == name)
    }

    /// Whether decoded images are kept in memory (the dataset fits in `data.cache_mb`).
    pub fn is_cached(&self) -> bool {
        self.cache.is_some()
    }

    /// RGB bytes (HWC, `size x size`) of file `index` of `domain`, from the cache when it holds this size.
    pub fn load_rgb(&self, domain: usize, index: usize, size: u32) -> Result<Arc<[u8]>> {
        let Some(path) = self.domains.get(domain).and_then(|d| d.files.get(index)) else {
            bail!("image {index} of domain {domain} does not exist in dataset {}", self.root.display());
        };
        let slot = self.cache.as_ref().filter(|c| c.image_size == size).map(|c| &c.slots[domain][index]);
        if let Some(cached) = slot.and_then(|s| s.get()) {
            return Ok(cached.clone());
        }
        let pixels: Arc<[u8]> = load_rgb_resized(path, size)?.into();
        if let Some(slot) = slot {
            // Another thread may have filled it meanwhile; both decodes are identical.
            let _ = slot.set(pixels.clone());
        }
        Ok(pixels)
    }
}

impl ImageCache {
    fn if_fits(domains: &[Domain], image_size: i64, cache_mb: usize) -> Option<ImageCache> {
        let images: usize = domains.iter().map(Domain::len).sum();
        let bytes = (images as u128) * 3 * (image_size as u128) * (image_size as u128);
        if cache_mb == 0 || bytes > (cache_mb as u128) << 20 {
            return None;
        }
        let slots = domains.iter().map(|d| (0..d.len()).map(|_| OnceLock::new()).collect()).collect();
        Some(ImageCache { image_size: u32::try_from(image_size).ok()?, slots })
    }
}

fn is_hidden(name: &OsString) -> bool {
    name.to_string_lossy().starts_with('.')
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(OsString, PathBuf)>> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list directory {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list directory {}", dir.display()))?;
        let name = entry.file_name();
        if !is_hidden(&name) {
            entries.push((name, entry.path()));
        }
    }
    entries.sort();
    Ok(entries)
}

/// Sorted names of the non-hidden subdirectories of `dir` (symlinks to directories count).
fn visible_subdirectories(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (name, path) in read_dir_sorted(dir)? {
        if path.is_dir() {
            let name = name
                .into_string()
                .map_err(|n| anyhow::anyhow!("directory name {:?} in {} is not valid UTF-8", n, dir.display()))?;
            names.push(name);
        }
    }
    Ok(names)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

/// Image files anywhere below `class_dir`, in `ImageFolder` order: directories in sorted path order,
/// files sorted by name within a directory.
fn image_files_below(class_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut by_directory: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    let mut pending = vec![class_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut files = Vec::new();
        for (_, path) in read_dir_sorted(&dir)? {
            if path.is_dir() {
                pending.push(path);
            } else if path.is_file() && has_image_extension(&path) {
                files.push(path);
            }
        }
        by_directory.push((dir, files));
    }
    by_directory.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(by_directory.into_iter().flat_map(|(_, files)| files).collect())
}
