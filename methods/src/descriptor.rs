//! What a method declares about itself, in one place: its names, hyperparameters (defaults, one doc
//! string each, random-search distributions), what crosses ranks, and how it is built.
//!
//! A method type implements [`MethodDef`] in its own file; [`MethodDescriptor::of`] turns it into a
//! plain table entry that `mgrun methods`, the config parser, `mgrun sweep`, `mgrun collect` and the
//! results records all read (the list is [`crate::METHODS`]).

use crate::Method;
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fmt;

/// How `mgrun sweep` draws a hyperparameter for hparams_seed > 0, in DomainBed's
/// `hparams_registry` style (numpy's `RandomState` calls named in each variant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Search {
    /// `10 ** r.uniform(low, high)`.
    LogUniform { low: f64, high: f64 },
    /// `r.uniform(low, high)`.
    Uniform { low: f64, high: f64 },
    /// `int(r.uniform(low, high))`.
    IntUniform { low: f64, high: f64 },
    /// `int(10 ** r.uniform(low, high))`.
    IntLogUniform { low: f64, high: f64 },
    /// `r.choice(values)`.
    Choice(&'static [f64]),
}

/// One field of a method's config section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyperparameter {
    /// The field under `[method.<name>]`.
    pub field: &'static str,
    pub doc: &'static str,
    /// `Some((DomainBed-style name, distribution))` when `mgrun sweep` draws it; the name is the
    /// key in results records' `hparams` (e.g. `sam_rho`).
    pub search: Option<(&'static str, Search)>,
}

impl Hyperparameter {
    /// A hyperparameter the sweep leaves at its configured value.
    pub const fn fixed(field: &'static str, doc: &'static str) -> Self {
        Self { field, doc, search: None }
    }

    /// A hyperparameter the sweep draws, recorded under `name`.
    pub const fn searched(field: &'static str, doc: &'static str, name: &'static str, search: Search) -> Self {
        Self { field, doc, search: Some((name, search)) }
    }
}

/// The collective a statistic crosses ranks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    AllReduceSum,
    AllGather,
    Broadcast,
}

/// The ranks a statistic is exchanged among.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Every rank of the job.
    World,
    /// The ranks holding pieces of one split domain (nothing when no domain is split).
    DomainGroup,
}

/// Size of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageSize {
    /// `n` values per parameter (nP floats).
    PerParameter(u32),
    /// `n` scalars.
    Scalars(u32),
    /// `n` values per training domain (K n floats).
    PerDomain(u32),
    /// Per training domain, the loss sum and the features' sum and second moment (K (1 + D + D^2)).
    PerDomainFeatureMoments,
    /// Per training domain, the loss sum and the head's per-sample gradients' sum and sum of squares
    /// (K (1 + 2 C (D + 1))).
    PerDomainHeadGradientMoments,
    /// The step's images as 8-bit pixels (K B x 3 x S x S bytes) and their labels.
    BatchImages,
    /// A row per image of the step: its domain, position and id, C values and `n` more (K B (3 + C + n)).
    ImageRows(u32),
}

/// A statistic that a method exchanges across ranks at every step on the fast path (deterministic
/// mode all-gathers micro-batch gradients instead, see [`crate::gradients`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossRankStat {
    pub name: &'static str,
    pub collective: Collective,
    pub size: MessageSize,
    pub group: Group,
}

impl CrossRankStat {
    /// The world all-reduce of one scalar: the ERM loss every method reports.
    pub const LOSS: CrossRankStat = CrossRankStat::world_sum("loss", MessageSize::Scalars(1));

    pub const fn world_sum(name: &'static str, size: MessageSize) -> Self {
        Self { name, collective: Collective::AllReduceSum, size, group: Group::World }
    }

    pub const fn domain_group_sum(name: &'static str) -> Self {
        Self {
            name,
            collective: Collective::AllReduceSum,
            size: MessageSize::PerParameter(1),
            group: Group::DomainGroup,
        }
    }
}

impl fmt::Display for Search {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Search::LogUniform { low, high } => write!(f, "10^U({low}, {high})"),
            Search::Uniform { low, high } => write!(f, "U({low}, {high})"),
            Search::IntUniform { low, high } => write!(f, "int(U({low}, {high}))"),
            Search::IntLogUniform { low, high } => write!(f, "int(10^U({low}, {high}))"),
            Search::Choice(values) => write!(f, "choice of {values:?}"),
        }
    }
}

impl fmt::Display for CrossRankStat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} of {} on {}", self.name, self.collective, self.size, self.group)
    }
}

impl fmt::Display for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Collective::AllReduceSum => "all_reduce_sum",
            Collective::AllGather => "all_gather",
            Collective::Broadcast => "broadcast",
        })
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Group::World => "world",
            Group::DomainGroup => "domain_group",
        })
    }
}

impl fmt::Display for MessageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageSize::PerParameter(1) => f.write_str("P"),
            MessageSize::PerParameter(n) => write!(f, "{n}P"),
            MessageSize::Scalars(n) => write!(f, "{n}"),
            MessageSize::PerDomain(1) => f.write_str("K"),
            MessageSize::PerDomain(n) => write!(f, "{n}K"),
            MessageSize::PerDomainFeatureMoments => f.write_str("K(1 + D + D^2)"),
            MessageSize::PerDomainHeadGradientMoments => f.write_str("K(1 + 2C(D + 1))"),
            MessageSize::BatchImages => f.write_str("KB images (uint8) and labels"),
            MessageSize::ImageRows(0) => f.write_str("KB(3 + C)"),
            MessageSize::ImageRows(n) => write!(f, "KB({} + C)", 3 + n),
        }
    }
}

impl MessageSize {
    /// Bytes of one message (scalars travel as f64, everything else as f32).
    pub fn bytes(self, dims: MessageDims) -> usize {
        let MessageDims { params, features, classes, domains, batch_images, batch_pixels } = dims;
        match self {
            MessageSize::PerParameter(n) => n as usize * params * 4,
            MessageSize::Scalars(n) => n as usize * 8,
            MessageSize::PerDomain(n) => n as usize * domains * 4,
            MessageSize::PerDomainFeatureMoments => domains * (1 + features + features * features) * 4,
            MessageSize::PerDomainHeadGradientMoments => domains * (1 + 2 * classes * (features + 1)) * 4,
            MessageSize::BatchImages => batch_pixels + batch_images * 8,
            MessageSize::ImageRows(n) => batch_images * (3 + classes + n as usize) * 4,
        }
    }
}

/// The sizes that a message's length depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageDims {
    /// Parameters P.
    pub params: usize,
    /// Features D (the head's input).
    pub features: usize,
    /// Classes C.
    pub classes: usize,
    /// Training domains K.
    pub domains: usize,
    /// Images of a step, K B, and their pixel values, K B x 3 x S x S.
    pub batch_images: usize,
    pub batch_pixels: usize,
}

/// The static side of a method type: everything [`MethodDescriptor`] records about it.
pub trait MethodDef: Method + Sized + 'static {
    /// The `[method.<NAME>]` section: serde with `deny_unknown_fields`, defaults from `Default`.
    type Config: Serialize + DeserializeOwned + Default;
    /// `method.name` in configs.
    const NAME: &'static str;
    /// DomainBed's algorithm class name (results records' `args.algorithm`; it also seeds DomainBed's
    /// random search, so it must match DomainBed's for its algorithms).
    const DOMAINBED_NAME: &'static str;
    /// One line for `mgrun methods`.
    const SUMMARY: &'static str;
    /// The paper (and code) it follows.
    const REFERENCE: &'static str;
    /// Every field of [`Self::Config`], in documentation order; searched ones are drawn in this order.
    const HYPERPARAMETERS: &'static [Hyperparameter];

    /// Value checks beyond the types (ranges); errors name `method.<NAME>.<field>`.
    fn validate(_config: &Self::Config) -> Result<()> {
        Ok(())
    }

    /// What crosses ranks at every step with this config.
    fn cross_rank_statistics(config: &Self::Config) -> Vec<CrossRankStat>;

    /// The method for `model` trained on `num_domains` training domains (`config` is validated).
    fn new(config: &Self::Config, model: &dyn Model, num_domains: usize) -> Result<Self>;
}

/// Builds a method from its (normalised) section for a model and a number of training domains.
type BuildFn = fn(&Value, &dyn Model, usize) -> Result<Box<dyn Method>>;

/// One entry of the method list: a [`MethodDef`]'s constants and its type-erased functions, which
/// work on the config section as a JSON value.
#[derive(Clone, Copy)]
pub struct MethodDescriptor {
    pub name: &'static str,
    pub domainbed_name: &'static str,
    pub summary: &'static str,
    pub reference: &'static str,
    pub hyperparameters: &'static [Hyperparameter],
    normalize: fn(&Value) -> Result<Value>,
    defaults: fn() -> Result<Value>,
    cross_rank: fn(&Value) -> Result<Vec<CrossRankStat>>,
    build: BuildFn,
}

impl fmt::Debug for MethodDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MethodDescriptor").field("name", &self.name).finish_non_exhaustive()
    }
}

impl MethodDescriptor {
    pub const fn of<M: MethodDef>() -> Self {
        Self {
            name: M::NAME,
            domainbed_name: M::DOMAINBED_NAME,
            summary: M::SUMMARY,
            reference: M::REFERENCE,
            hyperparameters: M::HYPERPARAMETERS,
            normalize: normalize::<M>,
            defaults: defaults::<M>,
            cross_rank: cross_rank::<M>,
            build: build::<M>,
        }
    }

    /// Parses and validates a `[method.<name>]` section; returns it with every field filled in.
    pub fn normalize(&self, section: &Value) -> Result<Value> {
        (self.normalize)(section)
    }

    /// The section with every field at its default.
    pub fn defaults(&self) -> Result<Value> {
        (self.defaults)()
    }

    pub fn cross_rank_statistics(&self, section: &Value) -> Result<Vec<CrossRankStat>> {
        (self.cross_rank)(section)
    }

    pub fn build(&self, section: &Value, model: &dyn Model, num_domains: usize) -> Result<Box<dyn Method>> {
        (self.build)(section, model, num_domains)
    }

    /// (config key, default as JSON text, doc) for every hyperparameter.
    pub fn documented_defaults(&self) -> Result<Vec<(String, String, &'static str)>> {
        let defaults = self.defaults()?;
        self.hyperparameters
            .iter()
            .map(|h| {
                let value = defaults.get(h.field).with_context(|| {
                    format!("method.{}.{}: documented, but the config has no such field", self.name, h.field)
                })?;
                Ok((format!("method.{}.{}", self.name, h.field), value.to_string(), h.doc))
            })
            .collect()
    }
}

/// Deserialises a section as `M::Config`, naming the field that is wrong.
fn parse<M: MethodDef>(section: &Value) -> Result<M::Config> {
    serde_path_to_error::deserialize(section).map_err(|e| {
        let field = e.path().to_string();
        let key = if field == "." { format!("method.{}", M::NAME) } else { format!("method.{}.{field}", M::NAME) };
        anyhow::anyhow!("key `{key}`: {}", e.into_inner())
    })
}

fn normalize<M: MethodDef>(section: &Value) -> Result<Value> {
    let config = parse::<M>(section)?;
    M::validate(&config)?;
    serde_json::to_value(&config).with_context(|| format!("serialising method.{}", M::NAME))
}

fn defaults<M: MethodDef>() -> Result<Value> {
    let value = serde_json::to_value(M::Config::default())
        .with_context(|| format!("serialising the defaults of method.{}", M::NAME))?;
    if !value.is_object() {
        bail!("method.{}: the config is not a table", M::NAME);
    }
    Ok(value)
}

fn cross_rank<M: MethodDef>(section: &Value) -> Result<Vec<CrossRankStat>> {
    Ok(M::cross_rank_statistics(&parse::<M>(section)?))
}

fn build<M: MethodDef>(section: &Value, model: &dyn Model, num_domains: usize) -> Result<Box<dyn Method>> {
    let config = parse::<M>(section)?;
    M::validate(&config)?;
    Ok(Box::new(M::new(&config, model, num_domains)?))
}
