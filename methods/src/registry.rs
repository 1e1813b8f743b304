//! The `[method]` config section over the method list ([`crate::METHODS`]): which method trains the
//! model, and a `[method.<name>]` section per method, parsed and validated by that method's
//! descriptor.

use crate::descriptor::{CrossRankStat, MethodDef, MethodDescriptor};
use crate::{Method, METHODS};
use anyhow::{anyhow, Context, Result};
use mgrun_models::Model;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// Names of the available methods, in list order.
pub fn available() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name).collect()
}

/// The descriptor of method `name`; the error lists the available ones.
pub fn descriptor(name: &str) -> Result<&'static MethodDescriptor> {
    METHODS
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| anyhow!("key `method.name`: unknown method {name:?} (available: {})", available().join(", ")))
}

/// `[method]`: the method's name and every method's section, each complete (defaults filled in)
/// and validated, so that a resolved config shows every value a run used.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodConfig {
    /// A name from [`available`] (see `mgrun methods`).
    pub name: String,
    /// Method name -> its section, as its descriptor normalised it.
    sections: BTreeMap<&'static str, Value>,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self::named("erm")
    }
}

impl MethodConfig {
    /// Method `name` with every section at its defaults (`name` is checked when the method is built).
    pub fn named(name: &str) -> Self {
        // Defaults are plain serde structs: serialising them cannot fail (the unit tests check it).
        let sections = METHODS.iter().map(|m| (m.name, m.defaults().unwrap_or(Value::Null))).collect();
        Self { name: name.to_string(), sections }
    }

    /// Method `M` with `config` as its section (every other section at its defaults).
    pub fn of<M: MethodDef>(config: &M::Config) -> Result<Self> {
        let mut out = Self::named(M::NAME);
        let section = serde_json::to_value(config).with_context(|| format!("serialising method.{}", M::NAME))?;
        out.set_section(M::NAME, &section)?;
        Ok(out)
    }

    /// Sets method `name`'s section from `section` (validated; missing fields take defaults).
    pub fn set_section(&mut self, name: &str, section: &Value) -> Result<()> {
        let descriptor = descriptor(name).with_context(|| format!("section [method.{name}]"))?;
        self.sections.insert(descriptor.name, descriptor.normalize(section)?);
        Ok(())
    }

    /// The typed config of method `M`.
    pub fn config_of<M: MethodDef>(&self) -> Result<M::Config> {
        let section = self.section(M::NAME)?;
        serde_json::from_value(section.clone()).with_context(|| format!("method.{}", M::NAME))
    }

    /// Method `name`'s complete section.
    pub fn section(&self, name: &str) -> Result<&Value> {
        self.sections.get(name).ok_or_else(|| anyhow!("no section [method.{name}]"))
    }

    /// The descriptor of the configured method.
    pub fn descriptor(&self) -> Result<&'static MethodDescriptor> {
        descriptor(&self.name)
    }

    /// What the configured method exchanges across ranks at every step.
    pub fn cross_rank_statistics(&self) -> Result<Vec<CrossRankStat>> {
        let descriptor = self.descriptor()?;
        descriptor.cross_rank_statistics(self.section(descriptor.name)?)
    }

    /// The values of the configured method's searched hyperparameters under their DomainBed-style
    /// names (`sam_rho`, `dsp_lambda`, ...), as results records' `hparams` hold them.
    pub fn searched_values(&self) -> Result<Vec<(&'static str, Value)>> {
        let descriptor = self.descriptor()?;
        let section = self.section(descriptor.name)?;
        Ok(descriptor
            .hyperparameters
            .iter()
            .filter_map(|h| h.search.map(|(name, _)| (name, section.get(h.field).cloned().unwrap_or(Value::Null))))
            .collect())
    }
}

/// Builds the configured method for `model` trained on `num_domains` training domains.
pub fn build(cfg: &MethodConfig, model: &dyn Model, num_domains: usize) -> Result<Box<dyn Method>> {
    let descriptor = cfg.descriptor()?;
    descriptor.build(cfg.section(descriptor.name)?, model, num_domains)
}

impl Serialize for MethodConfig {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1 + self.sections.len()))?;
        map.serialize_entry("name", &self.name)?;
        // In the list's order, each field where its method documents it, so that a written config
        // reads like the method's own docs.
        for descriptor in METHODS {
            if let Some(section) = self.sections.get(descriptor.name) {
                map.serialize_entry(descriptor.name, &DocumentedOrder { descriptor, section })?;
            }
        }
        map.end()
    }
}

/// A method's section with its fields in the order of its [`Hyperparameter`](crate::descriptor::Hyperparameter) list.
struct DocumentedOrder<'a> {
    descriptor: &'a MethodDescriptor,
    section: &'a Value,
}

impl Serialize for DocumentedOrder<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let Some(fields) = self.section.as_object() else { return self.section.serialize(serializer) };
        let documented: Vec<&str> = self.descriptor.hyperparameters.iter().map(|h| h.field).collect();
        let undocumented = fields.keys().map(String::as_str).filter(|k| !documented.contains(k));
        let mut map = serializer.serialize_map(Some(fields.len()))?;
        for key in documented.iter().copied().chain(undocumented) {
            if let Some(value) = fields.get(key) {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for MethodConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(MethodConfigVisitor)
    }
}

struct MethodConfigVisitor;

impl<'de> Visitor<'de> for MethodConfigVisitor {
    type Value = MethodConfig;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a table with `name` and sections named after methods ({})", available().join(", "))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<MethodConfig, A::Error> {
        let mut config = MethodConfig::default();
        let mut name = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "name" {
                let value: String = map.next_value()?;
                descriptor(&value).map_err(|e| de::Error::custom(format!("{e:#}")))?;
                name = Some(value);
                continue;
            }
            if !METHODS.iter().any(|m| m.name == key) {
                let expected: Vec<&str> = std::iter::once("name").chain(available()).collect();
                return Err(de::Error::custom(format!(
                    "unknown field `{key}`, expected one of {}",
                    expected.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                )));
            }
            let section: Value = map.next_value()?;
            config.set_section(&key, &section).map_err(|e| de::Error::custom(format!("{e:#}")))?;
        }
        if let Some(name) = name {
            config.name = name;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_documents_every_field_and_nothing_else() {
        for method in METHODS {
            let defaults = method.defaults().unwrap();
            let fields = defaults.as_object().unwrap();
            let documented = method.documented_defaults().unwrap();
            assert_eq!(fields.len(), documented.len(), "{}: fields {fields:?}", method.name);
            assert!(method.hyperparameters.iter().all(|h| !h.doc.is_empty()), "{}", method.name);
            method.normalize(&defaults).unwrap();
            method.cross_rank_statistics(&defaults).unwrap();
        }
    }

    #[test]
    fn names_are_unique() {
        let mut names = available();
        names.extend(METHODS.iter().map(|m| m.domainbed_name));
        let count = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), count, "{names:?}");
    }
}
