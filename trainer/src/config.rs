//! The typed job configuration: one TOML file, `--set a.b=value` overrides, and errors that name
//! the file, the key and the expected type.

use anyhow::{anyhow, bail, Context, Result};
use mgrun_checkpoint::Resume;
use mgrun_collectives::BackendChoice;
use mgrun_data::DataConfig;
use mgrun_methods::MethodConfig;
use mgrun_models::{ModelSpec, Precision};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub data: DataConfig,
    /// The architecture; its class count comes from the dataset.
    #[serde(default)]
    pub model: ModelSpec,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub method: MethodConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub comm: CommConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Stochastic weight averaging densely (SWAD), for any method. Left out of the serialised config
    /// while it is the default, so that checkpoints of runs without SWAD keep their fingerprint.
    #[serde(default, skip_serializing_if = "SwadConfig::is_default")]
    pub swad: SwadConfig,
    /// Monitoring; left out of the serialised config while default, like `swad`, and never part of
    /// a checkpoint's fingerprint (it does not change what is trained).
    #[serde(default, skip_serializing_if = "MetricsConfig::is_default")]
    pub metrics: MetricsConfig,
    #[serde(default, skip_serializing_if = "TraceConfig::is_default")]
    pub trace: TraceConfig,
}

/// `[metrics]`: the `metrics.jsonl` summaries are always written; a Prometheus endpoint on request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `"HOST:PORT"`: every rank serves its metrics on PORT + its local rank (see README "Monitoring").
    pub prometheus: Option<String>,
}

impl MetricsConfig {
    fn is_default(&self) -> bool {
        *self == MetricsConfig::default()
    }

    fn validate(&self) -> Result<()> {
        if let Some(address) = &self.prometheus {
            mgrun_telemetry::prometheus::rank_address(address, 0).context("key `metrics.prometheus`")?;
        }
        Ok(())
    }
}

/// `[trace]`: a Chrome trace per rank of the first `steps` steps, merged by the launcher into
/// `<out>/trace.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    pub enabled: bool,
    /// Steps traced from the start of the run (or of a resumed attempt): a trace is for looking at,
    /// and a long one only grows.
    pub steps: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self { enabled: false, steps: 200 }
    }
}

impl TraceConfig {
    fn is_default(&self) -> bool {
        *self == TraceConfig::default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub steps: u64,
    /// Adam learning rate (DomainBed's default 5e-5).
    pub lr: f64,
    /// Adam's coupled L2 weight decay (torch.optim.Adam), or AdamW's decoupled decay.
    pub weight_decay: f64,
    /// `adam` (torch.optim.Adam) or `adamw` (torch.optim.AdamW: decoupled weight decay).
    pub optimizer: OptimizerKind,
    pub seed: u64,
    /// DomainBed's `hparams_seed` of this run (0 = default hyperparameters); recorded in
    /// results.jsonl `args`, set by `mgrun sweep`.
    pub hparams_seed: u64,
    /// Reproducible mode: fixed algorithms, and the same bits on any number of ranks (each
    /// micro-batch of `micro_batch` images gets its own backward pass; their gradients are summed in
    /// one fixed order). CPU ranks then use `threads` threads (1 when unset), since libtorch's CPU
    /// kernels split their sums by thread count.
    pub deterministic: bool,
    /// Images per micro-batch in deterministic mode (the unit of work the plan gives ranks).
    pub micro_batch: usize,
    /// Intra-op threads per CPU rank; 0 = cores / ranks on this node (1 in deterministic mode).
    pub threads: usize,
    /// Seconds between progress lines on rank 0.
    pub progress_every_s: f64,
    /// Forward-pass arithmetic: `fp32` or `bf16` (autocast; parameters, gradients, losses and
    /// optimizer stay f32).
    #[serde(deserialize_with = "precision_by_name")]
    pub precision: Precision,
    /// Channels-last convolutions; unset = on for GPU ranks, off for CPU ranks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channels_last: Option<bool>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 5001,
            lr: 5e-5,
            weight_decay: 0.0,
            optimizer: OptimizerKind::Adam,
            seed: 0,
            hparams_seed: 0,
            deterministic: false,
            micro_batch: 8,
            threads: 0,
            progress_every_s: 5.0,
            precision: Precision::Fp32,
            channels_last: None,
        }
    }
}

/// Which Adam: both run as one fused pass over the flat parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.Adam: weight decay as a coupled L2 term in the gradient (DomainBed's choice).
    Adam,
    /// torch.optim.AdamW: weight decay applied to the weights, outside the moments.
    Adamw,
}

impl TrainConfig {
    /// The optimizer's settings.
    pub fn adam(&self) -> mgrun_methods::AdamConfig {
        mgrun_methods::AdamConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            decoupled_weight_decay: self.optimizer == OptimizerKind::Adamw,
            ..mgrun_methods::AdamConfig::default()
        }
    }

    /// Intra-op threads of one rank among `ranks_on_node` on this machine: `threads` when set; 1 for a
    /// CPU rank in deterministic mode (libtorch's CPU kernels split their sums by thread count, so a
    /// fixed count keeps the bits the same whatever the number of ranks); else OMP_NUM_THREADS (the
    /// launcher sets it), else the node's cores shared among its ranks.
    pub fn threads_per_rank(&self, cpu_rank: bool, ranks_on_node: usize) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        if self.deterministic && cpu_rank {
            return 1;
        }
        if let Some(threads) = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
            return threads.max(1);
        }
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / ranks_on_node.max(1)).max(1)
    }

    /// `train.channels_last` resolved for a rank on `device`.
    pub fn channels_last_on(&self, device: tch::Device) -> bool {
        self.channels_last.unwrap_or(device.is_cuda())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate after step 0, every `every_steps` steps and after the last step (DomainBed's
    /// checkpoint_freq).
    pub every_steps: u64,
    /// Images per forward pass during evaluation.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { every_steps: 300, batch_size: 128 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CommConfig {
    /// A collective that makes no progress for this long fails the rank (and the job).
    pub timeout_s: f64,
    /// Largest gradient bucket reduced by one collective.
    pub bucket_mb: f64,
    /// `auto` (NCCL on CUDA, TCP on CPU), `tcp` or `nccl`.
    pub backend: BackendChoice,
    /// Reduce the batch gradient's buckets while backward is still running (CPU ranks, fast path;
    /// the results are the same bits either way: see methods/src/overlap.rs).
    pub overlap: bool,
}

impl Default for CommConfig {
    fn default() -> Self {
        Self { timeout_s: 300.0, bucket_mb: 25.0, backend: BackendChoice::Auto, overlap: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save the state every this many steps (0 = never).
    pub every_steps: u64,
    /// How many committed checkpoints to keep (0 = all).
    pub keep_last: usize,
    /// Where checkpoints go; unset = `<out>/checkpoints`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `none`, `auto` (the checkpoint `latest` names in `dir`, if any) or the path of a checkpoint.
    pub resume: Resume,
    /// A resumed run may have another `train.steps` (`--extend`); every other identity key must match.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub extend: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 0, keep_last: 3, dir: None, resume: Resume::None, extend: false }
    }
}

/// SWAD (Cha et al. 2021, khanrc/swad's `LossValley`): parameters averaged every step inside the
/// segments between evaluations, and segments averaged over the valley of the training domains'
/// validation loss; training stops early when the valley ends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SwadConfig {
    pub enabled: bool,
    /// Evaluations in the convergence window: the run has converged once the oldest of the last
    /// `n_converge` segments has the lowest validation loss.
    pub n_converge: usize,
    /// Evaluations in the loss-smoothing window that decides when the valley ends.
    pub n_tolerance: usize,
    /// The valley's loss threshold is the mean of the converged window times (1 + ratio); swad
    /// uses 0.3, and 0.2 for VLCS.
    pub tolerance_ratio: f64,
}

impl Default for SwadConfig {
    fn default() -> Self {
        Self { enabled: false, n_converge: 3, n_tolerance: 6, tolerance_ratio: 0.3 }
    }
}

impl SwadConfig {
    fn is_default(&self) -> bool {
        *self == SwadConfig::default()
    }

    fn validate(&self) -> Result<()> {
        if self.n_converge == 0 {
            bail!("key `swad.n_converge`: must be at least 1");
        }
        if self.n_tolerance == 0 {
            bail!("key `swad.n_tolerance`: must be at least 1");
        }
        if !(self.tolerance_ratio.is_finite() && self.tolerance_ratio >= 0.0) {
            bail!("key `swad.tolerance_ratio`: must be a finite number >= 0, got {}", self.tolerance_ratio);
        }
        Ok(())
    }
}

impl JobConfig {
    /// Reads `path`, applies `overrides` (`a.b=value`, value in TOML syntax or a bare string) and
    /// checks the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
            // Where in the file: line and column of the error's span.
            let at = e.span().map_or(String::new(), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            });
            anyhow!("config {}{at}: {}", path.display(), e.message())
        })?;
        let file_table = table.clone();
        for ov in overrides {
            apply_override(&mut table, ov).with_context(|| format!("--set {ov}"))?;
        }
        typed(table).map_err(|error| {
            // Blame the file or the first `--set` that brings this very error in (a `--set` value that
            // fails a check was reported as an error in the file).
            let message = format!("{error:#}");
            let same_error_with = |applied: usize| {
                let mut table = file_table.clone();
                for ov in &overrides[..applied] {
                    let _ = apply_override(&mut table, ov);
                }
                typed(table).err().is_some_and(|e| format!("{e:#}") == message)
            };
            // With every `--set` applied the error is this one, so the search ends at the last at worst.
            match (0..overrides.len()).find(|&applied| same_error_with(applied)).unwrap_or(overrides.len()) {
                0 => anyhow!("config {}: {message}", path.display()),
                applied => anyhow!("--set {}: {message}", overrides[applied - 1]),
            }
        })
    }

    /// Resolves relative paths in the config against `base` (the directory of the config file's
    /// caller, normally the current directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if self.data.root.is_relative() {
            self.data.root = base.join(&self.data.root);
        }
        let pretrained = self.model.pretrained.as_mut().filter(|p| *p != Path::new(PRETRAINED_NONE));
        for path in [self.checkpoint.dir.as_mut(), pretrained].into_iter().flatten() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if let Resume::Path(path) = &mut self.checkpoint.resume {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    fn validate(&self) -> Result<()> {
        if self.train.steps == 0 {
            bail!("key `train.steps`: must be at least 1");
        }
        if !(self.train.lr.is_finite() && self.train.lr > 0.0) {
            bail!("key `train.lr`: must be a finite number > 0, got {}", self.train.lr);
        }
        if self.eval.batch_size == 0 {
            bail!("key `eval.batch_size`: must be at least 1");
        }
        if self.data.root.as_os_str().is_empty() {
            bail!("key `data.root`: is empty (give the dataset's directory; \".\" for the current one)");
        }
        if !(self.train.weight_decay.is_finite() && self.train.weight_decay >= 0.0) {
            bail!("key `train.weight_decay`: must be a finite number >= 0, got {}", self.train.weight_decay);
        }
        if self.data.batch_per_domain == 0 {
            bail!("key `data.batch_per_domain`: must be at least 1");
        }
        if self.train.micro_batch == 0 {
            bail!("key `train.micro_batch`: must be at least 1");
        }
        if self.eval.every_steps == 0 {
            bail!("key `eval.every_steps`: must be at least 1");
        }
        if self.comm.timeout_s.is_nan() || self.comm.timeout_s <= 0.0 {
            bail!("key `comm.timeout_s`: must be positive");
        }
        if self.comm.bucket_mb.is_nan() || self.comm.bucket_mb <= 0.0 {
            bail!("key `comm.bucket_mb`: must be positive");
        }
        // Checked here, before any rank starts, as well as where they are used.
        self.data.validate()?;
        if !mgrun_models::ARCHITECTURES.contains(&self.model.arch.as_str()) {
            bail!(
                "key `model.arch`: unknown architecture {:?} (expected one of {})",
                self.model.arch,
                mgrun_models::ARCHITECTURES.join(", ")
            );
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            bail!("key `model.dropout`: expected a probability in [0, 1), got {}", self.model.dropout);
        }
        self.swad.validate()?;
        self.metrics.validate()
    }
}

/// The table as a checked config; errors name the full key but not where the value came from.
fn typed(table: toml::Table) -> Result<JobConfig> {
    let config: JobConfig = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().message().to_string();
        // A section that parses its own parts (`[method]`) names the full key itself.
        if message.starts_with("key `") {
            anyhow!("{message}")
        } else {
            anyhow!("key `{key}`: {message}")
        }
    })?;
    config.validate()?;
    Ok(config)
}

/// The datasets of DomainBed's benchmarks, whose protocol starts from ImageNet weights.
const DOMAINBED_DATASETS: &[&str] = &["pacs", "vlcs", "office_home", "terra_incognita", "domain_net"];

/// `model.pretrained = "none"`: train from scratch, said explicitly.
pub const PRETRAINED_NONE: &str = "none";

impl JobConfig {
    /// The weights to start from: `None` for a fresh initialisation (`model.pretrained` unset or
    /// `"none"`).
    pub fn pretrained_weights(&self) -> Option<&Path> {
        self.model.pretrained.as_deref().filter(|p| *p != Path::new(PRETRAINED_NONE))
    }

    /// A DomainBed benchmark trains an ImageNet-pretrained ResNet. Training one from a random start
    /// without saying so would report numbers that are not comparable, so an unset `model.pretrained`
    /// stops the run with the command that makes the weights (`"none"` trains from scratch).
    pub fn check_pretrained(&self) -> Result<()> {
        let dataset = self.data.dataset.as_str();
        if self.model.pretrained.is_none()
            && DOMAINBED_DATASETS.contains(&dataset)
            && self.model.arch.starts_with("resnet")
        {
            bail!(
                "key `model.pretrained`: unset for {dataset} with {arch}. DomainBed starts from torchvision's \
                 ImageNet weights (IMAGENET1K_V1): make them once with `make weights` (needs the internet; writes \
                 weights/{arch}_v1.safetensors) and set model.pretrained = \"weights/{arch}_v1.safetensors\", or set \
                 model.pretrained = \"none\" to train from scratch",
                arch = self.model.arch
            );
        }
        Ok(())
    }

    /// DSP-Reg's `anchor` mode pulls the weights it finds domain-sensitive back towards the weights of
    /// its first step. From a pretrained start that is a prior; from a random start it pulls towards
    /// noise (see the README's DSP-Reg comparison), so it is said, once, before the run starts.
    pub fn dsp_anchor_warning(&self) -> Option<String> {
        if self.method.name != "dsp_reg" || self.pretrained_weights().is_some() {
            return None;
        }
        let mode = self.method.section("dsp_reg").ok()?.get("mode")?.as_str()?;
        (mode == "anchor").then(|| {
            "warning: method.dsp_reg.mode = \"anchor\" without model.pretrained: the anchor is the random \
             initialisation, which the domain-sensitive weights are pulled back to (it cost held-out accuracy in the \
             README's comparison); use the default mode = \"gate\", or set model.pretrained"
                .to_string()
        })
    }

    /// Checks what depends on the number of ranks. BatchNorm in training mode (`model.freeze_bn =
    /// false`) normalises with the statistics of the images one forward pass sees and keeps running
    /// statistics per rank: with domains sharded over several ranks, both differ from one process's
    /// (and between ranks). Synchronising them (SyncBN) needs an all-reduce inside the backward pass,
    /// which tch offers no hook for, so the combination is refused.
    pub fn check_world_size(&self, world_size: usize) -> Result<()> {
        if world_size > 1 && !self.model.freeze_bn && mgrun_models::has_batch_norm(&self.model.arch) {
            bail!(
                "key `model.freeze_bn`: false with {} (BatchNorm) on {world_size} ranks: each rank would normalise \
                 with its own images' batch statistics and keep its own running statistics, unlike one process; \
                 mgrun does not synchronise them. Set model.freeze_bn = true (DomainBed's published protocol) or \
                 train on 1 rank",
                self.model.arch
            );
        }
        Ok(())
    }
}

/// `train.precision` by name, saying why `fp16` is not offered.
fn precision_by_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Precision, D::Error> {
    String::deserialize(deserializer)?.parse().map_err(|e| <D::Error as serde::de::Error>::custom(format!("{e:#}")))
}

/// Sets `a.b.c = value` in `table`, creating intermediate tables. The value is parsed as TOML
/// (`3`, `1e-4`, `true`, `"x"`, `["a", "b"]`); anything that is not valid TOML is taken as a string.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| anyhow!("expected key=value, e.g. train.steps=100"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("invalid key {key:?}");
    }
    let raw = raw.trim();
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or_else(|| anyhow!("invalid key {key:?}"))?;
    let mut node = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = node.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| anyhow!("`{}` is not a table, cannot set {key}", parts[..=i].join(".")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    const BASE: &str = "[data]\nroot = \"d\"\n[train]\nsteps = 10\n";

    #[test]
    fn overrides_set_nested_keys_with_types() {
        let f = write(BASE);
        let c = JobConfig::load(
            f.path(),
            &["train.lr=1e-3".into(), "method.name=sam".into(), "data.test_domains=[\"a\"]".into()],
        )
        .unwrap();
        assert_eq!(c.train.lr, 1e-3);
        assert_eq!(c.train.steps, 10);
        assert_eq!(c.method.name, "sam");
        assert_eq!(c.data.test_domains, vec!["a".to_string()]);
    }

    #[test]
    fn an_error_brought_in_by_a_set_is_blamed_on_it_not_on_the_file() {
        let f = write(BASE);
        let file = f.path().display().to_string();
        let sets = |sets: &[&str]| sets.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (overrides, blamed) in [
            (sets(&["train.lr=1e-3", "train.lr=inf"]), "--set train.lr=inf: key `train.lr`"),
            (sets(&["train.stepz=3"]), "--set train.stepz=3: key `train"),
            (sets(&["eval.batch_size=0", "train.lr=1e-3"]), "--set eval.batch_size=0: key `eval.batch_size`"),
        ] {
            let err = format!("{:#}", JobConfig::load(f.path(), &overrides).unwrap_err());
            assert!(err.starts_with(blamed) && !err.contains(&file), "{overrides:?}: {err}");
        }
        // An error already in the file stays the file's, whatever is set beside it.
        let f = write(&format!("{BASE}lr = -1.0\n"));
        let err = format!("{:#}", JobConfig::load(f.path(), &sets(&["train.steps=5"])).unwrap_err());
        assert!(err.starts_with(&format!("config {}: key `train.lr`", f.path().display())), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let f = write(&format!("{BASE}stepz = 3\n"));
        let err = format!("{:#}", JobConfig::load(f.path(), &[]).unwrap_err());
        assert!(err.contains("stepz"), "{err}");
        assert!(err.contains(&f.path().display().to_string()), "{err}");
    }

    #[test]
    fn wrong_type_names_key_and_expected_type() {
        let f = write(BASE);
        let err = format!("{:#}", JobConfig::load(f.path(), &["train.steps=many".into()]).unwrap_err());
        assert!(err.contains("train.steps"), "{err}");
        assert!(err.contains("u64") || err.contains("integer"), "{err}");
    }

    #[test]
    fn unknown_override_key_is_rejected() {
        let f = write(BASE);
        let err = format!("{:#}", JobConfig::load(f.path(), &["model.depth=3".into()]).unwrap_err());
        assert!(err.contains("model") && err.contains("depth"), "{err}");
    }

    #[test]
    fn invalid_values_are_rejected() {
        let f = write(BASE);
        let err = format!("{:#}", JobConfig::load(f.path(), &["comm.backend=mpi".into()]).unwrap_err());
        assert!(err.contains("comm.backend"), "{err}");
        for (set, key) in
            [("train.lr=inf", "train.lr"), ("eval.batch_size=0", "eval.batch_size"), ("data.root=\"\"", "data.root")]
        {
            let err = format!("{:#}", JobConfig::load(f.path(), &[set.into()]).unwrap_err());
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn toml_syntax_errors_give_the_line_and_column() {
        let f = write(&format!("{BASE}\n[eval]\nevery_steps = = 3\n"));
        let err = format!("{:#}", JobConfig::load(f.path(), &[]).unwrap_err());
        let line = BASE.lines().count() + 3;
        assert!(err.contains(&format!(":{line}:")), "{err}");
    }

    #[test]
    fn precision_and_channels_last() {
        let f = write(BASE);
        let c = JobConfig::load(f.path(), &["train.precision=bf16".into()]).unwrap();
        assert_eq!(c.train.precision, Precision::Bf16);
        assert!(c.train.channels_last_on(tch::Device::Cuda(0)));
        assert!(!c.train.channels_last_on(tch::Device::Cpu));
        let c = JobConfig::load(f.path(), &["train.channels_last=true".into()]).unwrap();
        assert!(c.train.channels_last_on(tch::Device::Cpu));
        let err = format!("{:#}", JobConfig::load(f.path(), &["train.precision=fp16".into()]).unwrap_err());
        assert!(err.contains("train.precision") && err.contains("loss scaling"), "{err}");
        let err = format!("{:#}", JobConfig::load(f.path(), &["train.precision=fp8".into()]).unwrap_err());
        assert!(err.contains("fp8"), "{err}");
    }

    #[test]
    fn swad_section_defaults_and_validation() {
        let f = write(BASE);
        let c = JobConfig::load(f.path(), &[]).unwrap();
        assert_eq!(c.swad, SwadConfig::default());
        assert!(!c.swad.enabled);
        let c = JobConfig::load(f.path(), &["swad.enabled=true".into(), "swad.tolerance_ratio=0.2".into()]).unwrap();
        assert!(c.swad.enabled && c.swad.tolerance_ratio == 0.2 && c.swad.n_converge == 3 && c.swad.n_tolerance == 6);
        for (set, key) in [
            ("swad.n_converge=0", "swad.n_converge"),
            ("swad.n_tolerance=0", "swad.n_tolerance"),
            ("swad.tolerance_ratio=-0.1", "swad.tolerance_ratio"),
            ("swad.tolerance_ratio=nan", "swad.tolerance_ratio"),
        ] {
            let err = format!("{:#}", JobConfig::load(f.path(), &[set.into()]).unwrap_err());
            assert!(err.contains(key), "{set}: {err}");
        }
        let err = format!("{:#}", JobConfig::load(f.path(), &["swad.n_converg=2".into()]).unwrap_err());
        assert!(err.contains("n_converg"), "{err}");
    }
}
