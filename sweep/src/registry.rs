//! DomainBed's hyperparameter registry (`hparams_registry._hparams`) for the hyperparameters mgrun
//! has, mapped onto mgrun config keys; each method's own entries come from its descriptor
//! ([`mgrun_methods::Hyperparameter::search`]).
//!
//! Every entry is (default, random distribution). `hparams_seed == 0` means "defaults", which here
//! are the base config's values (the shipped dataset configs carry DomainBed's published defaults);
//! any other seed draws from numpy's `RandomState` exactly as DomainBed does, so the same
//! (algorithm, dataset, hparams_seed, trial_seed) gives DomainBed's values bit for bit.

use anyhow::{bail, Context, Result};
use mgrun_methods::{MethodDescriptor, Search, METHODS};
use mgrun_nprand::{seed_hash, PyArg, RandomState};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Which DomainBed registry draws the random values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryVersion {
    /// Commit 7df6f06 (the published tables): one `RandomState(seed_hash(hparams_seed, trial_seed))`,
    /// drawn in definition order.
    Published,
    /// DomainBed's current registry: one `RandomState(seed_hash(random_seed, name))` per hyperparameter.
    Current,
}

impl std::str::FromStr for RegistryVersion {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "published" => Ok(Self::Published),
            "current" => Ok(Self::Current),
            other => bail!("unknown hparams registry {other:?} (expected \"published\" or \"current\")"),
        }
    }
}

/// A hyperparameter value: DomainBed's are Python floats or ints.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HValue {
    Int(i64),
    Float(f64),
}

impl HValue {
    pub fn to_toml(self) -> toml::Value {
        match self {
            HValue::Int(v) => toml::Value::Integer(v),
            HValue::Float(v) => toml::Value::Float(v),
        }
    }

    fn from_toml(value: &toml::Value) -> Option<HValue> {
        match value {
            toml::Value::Integer(v) => Some(HValue::Int(*v)),
            toml::Value::Float(v) => Some(HValue::Float(*v)),
            _ => None,
        }
    }

    fn from_json(value: &serde_json::Value) -> Option<HValue> {
        match value.as_i64() {
            Some(v) if !value.is_f64() => Some(HValue::Int(v)),
            _ => value.as_f64().map(HValue::Float),
        }
    }
}

impl fmt::Display for HValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HValue::Int(v) => write!(f, "{v}"),
            HValue::Float(v) => write!(f, "{v:e}"),
        }
    }
}

/// One resolved hyperparameter of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hparam {
    /// DomainBed's name (`lr`, `batch_size`, `resnet_dropout`, `weight_decay`, ...).
    pub name: String,
    /// The mgrun config key it sets (`train.lr`, `data.batch_per_domain`, ...).
    pub key: String,
    pub value: HValue,
}

/// DomainBed's dataset class name for an mgrun `data.dataset` (DomainBed's `collect_results` only
/// tabulates datasets it knows by these names); other names pass through.
pub fn domainbed_dataset_name(dataset: &str) -> &str {
    match dataset {
        "pacs" => "PACS",
        "vlcs" => "VLCS",
        "office_home" => "OfficeHome",
        "terra_incognita" => "TerraIncognita",
        "domain_net" => "DomainNet",
        other => other,
    }
}

/// DomainBed's algorithm class name for an mgrun `method.name` (from the method's descriptor);
/// unknown names pass through.
pub fn domainbed_algorithm_name(method: &str) -> &str {
    METHODS.iter().find(|m| m.name == method).map_or(method, |m| m.domainbed_name)
}

/// Draws values in DomainBed's way for one (hparams_seed, trial_seed).
struct Sampler<'a> {
    version: RegistryVersion,
    /// `None` for hparams_seed 0: every entry takes its default and nothing is drawn.
    random_seed: Option<u32>,
    shared: RandomState,
    base: &'a toml::Table,
    out: Vec<Hparam>,
}

impl Sampler<'_> {
    fn define(
        &mut self,
        name: &str,
        key: &str,
        fallback_default: HValue,
        random: impl FnOnce(&mut RandomState) -> Result<HValue>,
    ) -> Result<()> {
        let value = match self.random_seed {
            None => lookup(self.base, key)
                .map(|v| HValue::from_toml(v).with_context(|| format!("base config key `{key}` is not a number")))
                .transpose()?
                .unwrap_or(fallback_default),
            Some(random_seed) => match self.version {
                RegistryVersion::Published => random(&mut self.shared)?,
                RegistryVersion::Current => {
                    let seed = seed_hash(&[PyArg::Int(random_seed as i64), PyArg::Str(name.to_string())]);
                    random(&mut RandomState::new(seed))?
                }
            },
        };
        self.out.push(Hparam { name: name.to_string(), key: key.to_string(), value });
        Ok(())
    }
}

fn lookup<'a>(table: &'a toml::Table, dotted: &str) -> Option<&'a toml::Value> {
    let mut parts = dotted.split('.');
    let mut node = table.get(parts.next()?)?;
    for part in parts {
        node = node.as_table()?.get(part)?;
    }
    Some(node)
}

fn log_uniform(r: &mut RandomState, low: f64, high: f64) -> HValue {
    HValue::Float(10f64.powf(r.uniform(low, high)))
}

fn choice(r: &mut RandomState, items: &[f64]) -> Result<HValue> {
    Ok(HValue::Float(*r.choice(items).context("drawing a choice")?))
}

fn draw(r: &mut RandomState, search: Search) -> Result<HValue> {
    Ok(match search {
        Search::LogUniform { low, high } => log_uniform(r, low, high),
        Search::Uniform { low, high } => HValue::Float(r.uniform(low, high)),
        // Python's int() truncates towards zero, as `as` does.
        Search::IntUniform { low, high } => HValue::Int(r.uniform(low, high) as i64),
        Search::IntLogUniform { low, high } => HValue::Int(10f64.powf(r.uniform(low, high)) as i64),
        Search::Choice(values) => choice(r, values)?,
    })
}

/// The method's searched hyperparameters, after the shared ones, in its declaration order.
fn define_method_entries(s: &mut Sampler<'_>, method: &MethodDescriptor) -> Result<()> {
    let defaults = method.defaults()?;
    for h in method.hyperparameters {
        let Some((name, search)) = h.search else { continue };
        let key = format!("method.{}.{}", method.name, h.field);
        let default = defaults
            .get(h.field)
            .and_then(HValue::from_json)
            .with_context(|| format!("`{key}`: a searched hyperparameter must default to a number"))?;
        s.define(name, &key, default, |r| draw(r, search))?;
    }
    Ok(())
}

/// mgrun's MNIST-sized datasets (28 px digits), searched with DomainBed's `SMALL_IMAGES` distributions
/// (RotatedMNIST, ColoredMNIST).
const SMALL_IMAGES: &[&str] = &["rotated_digits", "colored_digits"];

/// The hyperparameters of one run of `algorithm` (mgrun method name) on `dataset` (mgrun
/// `data.dataset`), in DomainBed's definition order. `base` is the fully resolved base config.
pub fn hparams(
    version: RegistryVersion,
    algorithm: &str,
    dataset: &str,
    hparams_seed: u64,
    trial_seed: u64,
    base: &toml::Table,
) -> Result<Vec<Hparam>> {
    let Some(method) = METHODS.iter().find(|m| m.name == algorithm) else {
        let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
        bail!("algorithm {algorithm:?} has no hyperparameter registry entry (known: {})", known.join(", "));
    };
    // train.py: random_hparams(algorithm, dataset, seed_hash(hparams_seed, trial_seed)).
    let random_seed =
        (hparams_seed != 0).then(|| seed_hash(&[PyArg::Int(hparams_seed as i64), PyArg::Int(trial_seed as i64)]));
    let mut s =
        Sampler { version, random_seed, shared: RandomState::new(random_seed.unwrap_or(0)), base, out: Vec::new() };
    // Shared entries in 7df6f06's order; the digits datasets take its SMALL_IMAGES (MNIST) branch.
    s.define("resnet_dropout", "model.dropout", HValue::Float(0.0), |r| choice(r, &[0.0, 0.1, 0.5]))?;
    if SMALL_IMAGES.contains(&dataset) {
        s.define("lr", "train.lr", HValue::Float(1e-3), |r| Ok(log_uniform(r, -4.5, -2.5)))?;
        s.define("batch_size", "data.batch_per_domain", HValue::Int(64), |r| {
            Ok(HValue::Int(2f64.powf(r.uniform(3.0, 9.0)) as i64))
        })?;
        s.define("weight_decay", "train.weight_decay", HValue::Float(0.0), |_| Ok(HValue::Float(0.0)))?;
    } else {
        s.define("lr", "train.lr", HValue::Float(5e-5), |r| Ok(log_uniform(r, -5.0, -3.5)))?;
        let batch_exponent_max = if domainbed_dataset_name(dataset) == "DomainNet" { 5.0 } else { 5.5 };
        s.define("batch_size", "data.batch_per_domain", HValue::Int(32), |r| {
            Ok(HValue::Int(2f64.powf(r.uniform(3.0, batch_exponent_max)) as i64))
        })?;
        s.define("weight_decay", "train.weight_decay", HValue::Float(0.0), |r| Ok(log_uniform(r, -6.0, -2.0)))?;
    }
    define_method_entries(&mut s, method)?;
    Ok(s.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_zero_takes_the_base_config_values_and_fallbacks() {
        let base: toml::Table = toml::from_str("[train]\nlr = 0.002\n").unwrap();
        let hp = hparams(RegistryVersion::Published, "dsp_reg", "synthetic", 0, 2, &base).unwrap();
        let get = |n: &str| hp.iter().find(|h| h.name == n).unwrap().value;
        assert_eq!(get("lr"), HValue::Float(0.002));
        assert_eq!(get("batch_size"), HValue::Int(32));
        assert_eq!(get("dsp_beta"), HValue::Float(0.95));
    }

    #[test]
    fn random_values_lie_in_domainbed_ranges() {
        let base = toml::Table::new();
        for version in [RegistryVersion::Published, RegistryVersion::Current] {
            for seed in 1..50 {
                let hp = hparams(version, "sam", "domain_net", seed, seed % 3, &base).unwrap();
                for h in &hp {
                    match (h.name.as_str(), h.value) {
                        ("lr", HValue::Float(v)) => assert!((1e-5..=10f64.powf(-3.5)).contains(&v)),
                        ("batch_size", HValue::Int(v)) => assert!((8..=31).contains(&v), "{v}"),
                        ("resnet_dropout", HValue::Float(v)) => assert!([0.0, 0.1, 0.5].contains(&v)),
                        ("weight_decay", HValue::Float(v)) => assert!((1e-6..=1e-2).contains(&v)),
                        ("sam_rho", HValue::Float(v)) => assert!((0.01..=10f64.powf(-0.5)).contains(&v)),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_algorithm_is_named() {
        let err = hparams(RegistryVersion::Published, "irm", "pacs", 1, 0, &toml::Table::new()).unwrap_err();
        assert!(err.to_string().contains("irm"), "{err}");
    }
}
