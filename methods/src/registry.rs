//! The `[method]` config section, the table of methods, and the constructor the trainer calls.

use crate::dsp_reg::{DspReg, DspRegConfig};
use crate::erm::{Erm, ErmConfig};
use crate::sam::{Sam, SamConfig};
use crate::Method;
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};

/// `[method]`: which method trains the model and every method's hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodConfig {
    /// `erm`, `sam` or `dsp_reg` (see `mgrun methods`).
    pub name: String,
    pub erm: ErmConfig,
    pub dsp_reg: DspRegConfig,
    pub sam: SamConfig,
}

impl Default for MethodConfig {
    fn default() -> Self {
        Self {
            name: "erm".to_string(),
            erm: ErmConfig::default(),
            dsp_reg: DspRegConfig::default(),
            sam: SamConfig::default(),
        }
    }
}

/// One entry of `mgrun methods`.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodInfo {
    pub name: &'static str,
    pub summary: &'static str,
    /// (config key such as `method.sam.rho`, default value as JSON text, description).
    pub hyperparameters: Vec<(String, String, String)>,
}

const METHODS: &[(&str, &str)] = &[
    ("erm", "Empirical risk minimisation: mean cross-entropy over all training domains, one backward per step."),
    (
        "sam",
        "Sharpness-aware minimisation (SAM/ASAM): gradient at theta + rho*g/||g||, two passes per step; \
         perturbation from the global or per-rank gradient.",
    ),
    (
        "dsp_reg",
        "Domain-Sensitive Parameter Regularization: per-parameter cross-domain gradient variance (EMA) weights \
         an anchor/shrink penalty or gates the update; one backward per domain.",
    ),
];

/// Names of the available methods.
pub fn available() -> Vec<&'static str> {
    METHODS.iter().map(|(name, _)| *name).collect()
}

/// Builds the configured method for `model` trained on `num_domains` training domains.
pub fn build(cfg: &MethodConfig, model: &dyn Model, num_domains: usize) -> Result<Box<dyn Method>> {
    match cfg.name.as_str() {
        "erm" => Ok(Box::new(Erm::new(&cfg.erm))),
        "sam" => Ok(Box::new(Sam::new(&cfg.sam)?)),
        "dsp_reg" => Ok(Box::new(DspReg::new(&cfg.dsp_reg, model, num_domains)?)),
        other => bail!("method.name: unknown method {other:?} (available: {})", available().join(", ")),
    }
}

/// Every method with its hyperparameters, defaults (taken from the config's `Default`) and docs.
pub fn describe() -> Vec<MethodInfo> {
    METHODS
        .iter()
        .map(|&(name, summary)| {
            let hyperparameters = match name {
                "sam" => hyperparameters("sam", &SamConfig::default(), SamConfig::FIELD_DOCS),
                "dsp_reg" => hyperparameters("dsp_reg", &DspRegConfig::default(), DspRegConfig::FIELD_DOCS),
                _ => Ok(Vec::new()),
            };
            // Defaults are plain serde structs: serialisation cannot fail, and the unit tests
            // check that every field has a doc entry.
            MethodInfo { name, summary, hyperparameters: hyperparameters.unwrap_or_default() }
        })
        .collect()
}

/// (key, default, doc) for every field of `defaults`, in the docs' order.
fn hyperparameters<T: Serialize>(
    method: &str,
    defaults: &T,
    docs: &[(&str, &str)],
) -> Result<Vec<(String, String, String)>> {
    let value = serde_json::to_value(defaults).with_context(|| format!("serialising method.{method} defaults"))?;
    let fields = value.as_object().with_context(|| format!("method.{method} defaults are not a table"))?;
    if fields.len() != docs.len() {
        bail!("method.{method}: {} fields but {} documented", fields.len(), docs.len());
    }
    docs.iter()
        .map(|(field, doc)| {
            let default =
                fields.get(*field).with_context(|| format!("method.{method}.{field}: documented, no such field"))?;
            Ok((format!("method.{method}.{field}"), default.to_string(), doc.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_documented() {
        hyperparameters("sam", &SamConfig::default(), SamConfig::FIELD_DOCS).unwrap();
        hyperparameters("dsp_reg", &DspRegConfig::default(), DspRegConfig::FIELD_DOCS).unwrap();
    }
}
