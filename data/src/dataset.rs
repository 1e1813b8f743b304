//! Scanning a DomainBed-layout dataset tree: domains, one global class list, labels, in/out splits.

use crate::config::{DataConfig, OnCorrupt, SplitKind};
use crate::image_io::{default_threads, load_rgb_resized, unreadable_images, IMAGE_EXTENSIONS};
use crate::registry::{self, relative_slash_path, DatasetSpec};
use crate::split::split_in_out;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap, HashSet};
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
    /// Indices into `files` of the training ("in") and held-out ("out") split, in DomainBed's index order
    /// (the shuffled order; for DomainNet's official split, the order of the list files).
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
    spec: Option<&'static DatasetSpec>,
    skipped: Vec<PathBuf>,
}

/// Decoded and resized RGB bytes of every image at one size, filled on first use.
#[derive(Debug)]
struct ImageCache {
    image_size: u32,
    slots: Vec<Vec<OnceLock<Arc<[u8]>>>>,
}

/// A dataset tree as found on disk, problems included: what `Dataset::open` refuses and `mgrun data inspect`
/// reports.
#[derive(Debug, Clone)]
pub(crate) struct TreeScan {
    /// The root, its domain directories and those missing or extra.
    pub dirs: DomainDirs,
    /// The domains found, in environment order (a known dataset's list, else sorted directory names).
    pub domains: Vec<ScannedDomain>,
    /// The sorted union of every domain's class directories.
    pub classes: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ScannedDomain {
    pub name: String,
    /// Each class directory with its image files in `ImageFolder` order.
    pub classes: Vec<(String, Vec<PathBuf>)>,
}

impl ScannedDomain {
    pub fn images(&self) -> usize {
        self.classes.iter().map(|(_, files)| files.len()).sum()
    }
}

impl TreeScan {
    /// Class directories that are empty in a domain or missing from it while other domains have them:
    /// DomainBed's per-domain `ImageFolder` would shift that domain's labels, and a class without
    /// images in a domain makes its statistics meaningless. `mgrun data inspect` reports these as
    /// errors, and training refuses them unless `data.allow_missing_classes`.
    pub fn class_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // A domain without any image is reported as such, by name, where the domains are checked.
        for scanned in self.domains.iter().filter(|d| d.images() > 0) {
            let dir = self.dirs.root.join(&scanned.name);
            for (class, files) in &scanned.classes {
                if files.is_empty() {
                    problems.push(format!("class directory {} has no images", dir.join(class).display()));
                }
            }
            let present: Vec<&String> = scanned.classes.iter().map(|(c, _)| c).collect();
            let missing: Vec<&String> = self.classes.iter().filter(|c| !present.contains(c)).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "domain '{}' lacks class director{} {} that other domains have (DomainBed's per-domain \
                     ImageFolder would shift its labels)",
                    scanned.name,
                    if missing.len() == 1 { "y" } else { "ies" },
                    missing.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ")
                ));
            }
        }
        problems
    }
}

/// The domain directories of a dataset tree, found without listing any image.
#[derive(Debug, Clone)]
pub(crate) struct DomainDirs {
    /// The canonical root.
    pub root: PathBuf,
    pub spec: Option<&'static DatasetSpec>,
    /// The domains found, in environment order (a known dataset's list, else sorted directory names).
    pub present: Vec<String>,
    /// Domain directories a known dataset needs that are not there.
    pub missing: Vec<String>,
    /// Directories under the root that are not domains of a known dataset.
    pub extra: Vec<String>,
}

fn find_domain_dirs(cfg: &DataConfig) -> Result<DomainDirs> {
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
    let spec = registry::spec(&cfg.dataset);
    let found = visible_subdirectories(&root)?;
    let (present, missing, extra) = match spec {
        Some(spec) => {
            let wanted = spec.domain_dirs();
            let present: Vec<String> =
                wanted.iter().filter(|d| found.iter().any(|f| f == *d)).map(|d| d.to_string()).collect();
            let missing = wanted.iter().filter(|d| !found.iter().any(|f| f == *d)).map(|d| d.to_string()).collect();
            let extra = found.iter().filter(|f| !wanted.contains(&f.as_str())).cloned().collect();
            (present, missing, extra)
        }
        None => (found, Vec::new(), Vec::new()),
    };
    Ok(DomainDirs { root, spec, present, missing, extra })
}

impl DomainDirs {
    /// The checks that need only the domain directories: every domain of a known dataset is there, there is
    /// at least one, and `data.test_domains` names domains and leaves one to train on. Returns the sorted
    /// indices of the test domains.
    fn test_domains(&self, cfg: &DataConfig) -> Result<Vec<usize>> {
        let root = &self.root;
        if !self.missing.is_empty() {
            let spec_name = self.spec.map_or("", |s| s.name);
            bail!(
                "data.root: {} is missing the {spec_name} domain director{} {} (expected {}; found: {})",
                root.display(),
                if self.missing.len() == 1 { "y" } else { "ies" },
                self.missing.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(", "),
                self.spec.map(|s| s.domain_dirs().join(", ")).unwrap_or_default(),
                visible_subdirectories(root)?.join(", ")
            );
        }
        if self.present.is_empty() {
            bail!(
                "data.root: no domain directories in {} (expected {}/<domain>/<class>/<image>.jpg)",
                root.display(),
                root.display()
            );
        }
        let mut test_domains = Vec::new();
        for wanted in &cfg.test_domains {
            match resolve_domain(wanted, &self.present, self.spec) {
                Some(i) if !test_domains.contains(&i) => test_domains.push(i),
                Some(_) => {}
                None => bail!(
                    "data.test_domains: '{wanted}' is not a domain of {} (available: {}{})",
                    root.display(),
                    self.present.join(", "),
                    self.spec
                        .map(|s| format!(
                            "; short names {}",
                            s.domains.iter().map(|d| d.short).collect::<Vec<_>>().join(", ")
                        ))
                        .unwrap_or_default()
                ),
            }
        }
        test_domains.sort_unstable();
        if test_domains.len() == self.present.len() {
            bail!(
                "data.test_domains: all {} domains ({}) are held out; at least one training domain is needed",
                self.present.len(),
                self.present.join(", ")
            );
        }
        Ok(test_domains)
    }
}

/// Scans `cfg.root` without judging it; fails only when the root itself cannot be read.
pub(crate) fn scan_tree(cfg: &DataConfig) -> Result<TreeScan> {
    let dirs = find_domain_dirs(cfg)?;
    let mut domains = Vec::with_capacity(dirs.present.len());
    let mut all_classes = BTreeSet::new();
    for name in &dirs.present {
        let domain_dir = dirs.root.join(name);
        let mut classes = Vec::new();
        for class in visible_subdirectories(&domain_dir)? {
            let files = image_files_below(&domain_dir.join(&class))?;
            all_classes.insert(class.clone());
            classes.push((class, files));
        }
        domains.push(ScannedDomain { name: name.clone(), classes });
    }
    let classes = all_classes.into_iter().collect();
    Ok(TreeScan { domains, classes, dirs })
}

impl Dataset {
    /// Scans `cfg.root`. Domains are a known dataset's domain directories in DomainBed's environment order
    /// (other directories are ignored), or for `synthetic`/`folder` the sorted non-hidden subdirectories of
    /// the root. Classes are the union of the non-hidden subdirectories of the domains (sorted), images every
    /// non-hidden `.jpg`/`.jpeg`/`.png` file (any case) below a class directory; other files are ignored.
    /// With `data.on_corrupt = "skip"` every image is decoded here and the unreadable ones are left out.
    pub fn open(cfg: &DataConfig) -> Result<Dataset> {
        Self::open_checked(cfg, None)
    }

    /// What [`Dataset::open`] checks without listing any image (the domain directories and
    /// `data.test_domains`): cheap enough for the launcher to run before any rank starts.
    pub fn check_domains(cfg: &DataConfig) -> Result<()> {
        cfg.validate()?;
        find_domain_dirs(cfg)?.test_domains(cfg).map(drop)
    }

    /// [`Dataset::open`] with `unreadable` already known (from `mgrun data inspect`): with
    /// `data.on_corrupt = "skip"` those files are left out without decoding the tree again.
    pub fn open_excluding(cfg: &DataConfig, unreadable: &[PathBuf]) -> Result<Dataset> {
        Self::open_checked(cfg, Some(unreadable))
    }

    fn open_checked(cfg: &DataConfig, known_unreadable: Option<&[PathBuf]>) -> Result<Dataset> {
        cfg.validate()?;
        let scan = scan_tree(cfg)?;
        let test_domains = scan.dirs.test_domains(cfg)?;
        let root = scan.dirs.root.clone();
        let problems = scan.class_problems();
        if !problems.is_empty() {
            if !cfg.allow_missing_classes {
                bail!(
                    "data.root {}: {} (`mgrun data inspect` shows the tree; set data.allow_missing_classes = true to \
                     train on it anyway)",
                    root.display(),
                    problems.join("; ")
                );
            }
            eprintln!("warning: data.allow_missing_classes = true: {}", problems.join("; "));
        }
        let classes = scan.classes.clone();

        let mut skipped = Vec::new();
        let mut domains = Vec::with_capacity(scan.domains.len());
        for (env_index, scanned) in scan.domains.iter().enumerate() {
            let domain_dir = root.join(&scanned.name);
            let mut files = Vec::new();
            let mut labels = Vec::new();
            for (class, images) in &scanned.classes {
                // `classes` is the sorted union of every domain's class directories, so the search succeeds.
                let label = classes.binary_search(class).unwrap_or_default() as i64;
                labels.extend(std::iter::repeat_n(label, images.len()));
                files.extend(images.iter().cloned());
            }
            if files.is_empty() {
                bail!(
                    "domain '{}' ({}) has no images: expected {}/<class>/<image>.{{{}}}",
                    scanned.name,
                    domain_dir.display(),
                    domain_dir.display(),
                    IMAGE_EXTENSIONS.join(",")
                );
            }
            if cfg.on_corrupt == OnCorrupt::Skip {
                let bad: HashSet<PathBuf> = match known_unreadable {
                    Some(known) => known.iter().cloned().collect(),
                    None => unreadable_images(&files, default_threads()).into_iter().map(|b| b.path).collect(),
                };
                let keep: Vec<bool> = files.iter().map(|f| !bad.contains(f)).collect();
                skipped.extend(files.iter().zip(&keep).filter(|(_, k)| !**k).map(|(f, _)| f.clone()));
                files = files.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(f, _)| f).collect();
                labels = labels.into_iter().zip(&keep).filter(|(_, k)| **k).map(|(l, _)| l).collect();
                if files.is_empty() {
                    bail!("domain '{}' ({}): every image is unreadable", scanned.name, domain_dir.display());
                }
            }
            let (in_split, out_split) = match cfg.split {
                SplitKind::Random => split_in_out(files.len(), cfg.holdout_fraction, cfg.split_seed, env_index),
                SplitKind::Official => official_split(&root, &scanned.name, &files)?,
            };
            domains.push(Domain { name: scanned.name.clone(), files, labels, in_split, out_split });
        }

        let train_domains: Vec<usize> = (0..domains.len()).filter(|i| !test_domains.contains(i)).collect();

        let cache = ImageCache::if_fits(&domains, cfg.image_size, cfg.cache_mb);
        Ok(Dataset { root, spec: scan.dirs.spec, classes, domains, train_domains, test_domains, cache, skipped })
    }

    /// The known dataset this is (`None` for `synthetic` and `folder`).
    pub fn spec(&self) -> Option<&'static DatasetSpec> {
        self.spec
    }

    /// Images left out because they could not be decoded (`data.on_corrupt = "skip"`).
    pub fn skipped(&self) -> &[PathBuf] {
        &self.skipped
    }

    /// One global, sorted class list (the union over domains); labels index into it.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Every domain, in DomainBed's environment order (sorted by directory name).
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
///
/// Directory symlinks are followed once: a directory reached again (by device and inode) is a cycle or
/// a second link that would read the same images twice, and is an error naming the link. An image
/// name whose link leads nowhere (dangling, or looping on itself) is kept, so that decoding it fails
/// under `data.on_corrupt` like any unreadable image instead of vanishing.
fn image_files_below(class_dir: &Path) -> Result<Vec<PathBuf>> {
    use std::os::unix::fs::MetadataExt;
    let identity = |dir: &Path| -> Result<(u64, u64)> {
        let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        Ok((meta.dev(), meta.ino()))
    };
    let mut visited = HashSet::from([identity(class_dir)?]);
    let mut by_directory: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
    let mut pending = vec![class_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut files = Vec::new();
        for (_, path) in read_dir_sorted(&dir)? {
            if path.is_dir() {
                if !visited.insert(identity(&path)?) {
                    bail!(
                        "{} leads to a directory already read under {} (a symlink cycle or a second link): its \
                         images would be read twice; remove the link",
                        path.display(),
                        class_dir.display()
                    );
                }
                pending.push(path);
            } else if has_image_extension(&path) && (path.is_file() || path.is_symlink()) {
                files.push(path);
            }
        }
        by_directory.push((dir, files));
    }
    by_directory.sort_by(|a, b| a.0.as_os_str().cmp(b.0.as_os_str()));
    Ok(by_directory.into_iter().flat_map(|(_, files)| files).collect())
}

/// `data.test_domains` entry -> domain index: a directory name, a DomainBed short name (any case) or an index.
fn resolve_domain(wanted: &str, names: &[String], spec: Option<&DatasetSpec>) -> Option<usize> {
    if let Some(i) = names.iter().position(|n| n == wanted) {
        return Some(i);
    }
    if let Some(spec) = spec {
        if let Some(i) = spec.domains.iter().position(|d| d.short.eq_ignore_ascii_case(wanted)) {
            return names.iter().position(|n| n == spec.domains[i].dir);
        }
    }
    wanted.parse::<usize>().ok().filter(|&i| i < names.len())
}

/// DomainNet's official split of `domain`: `<root>/<domain>_train.txt` is "in", `<domain>_test.txt` "out",
/// each line `<domain>/<class>/<file> <label>` relative to the root, kept in list order. Labels come from the
/// class directories (the same sorted class map as the random split), so the list's label column is not used.
fn official_split(root: &Path, domain: &str, files: &[PathBuf]) -> Result<(Vec<usize>, Vec<usize>)> {
    let index: HashMap<String, usize> =
        files.iter().enumerate().map(|(i, f)| (relative_slash_path(root, f), i)).collect();
    let read = |suffix: &str| -> Result<Vec<usize>> {
        let list = root.join(format!("{domain}_{suffix}.txt"));
        let text = fs::read_to_string(&list).with_context(|| {
            format!("data.split = \"official\": cannot read DomainNet split file {}", list.display())
        })?;
        let mut picked = Vec::new();
        for (line_number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            // Paths may contain spaces; the label is the last field.
            let path = line.rsplit_once(' ').map_or(line, |(path, _label)| path);
            match index.get(path) {
                Some(&i) => picked.push(i),
                None => bail!(
                    "{}:{}: {path} is not an image of domain '{domain}' under {} (missing, unreadable or skipped)",
                    list.display(),
                    line_number + 1,
                    root.display()
                ),
            }
        }
        Ok(picked)
    };
    Ok((read("train")?, read("test")?))
}
