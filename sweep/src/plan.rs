//! Expanding a sweep into runs, in DomainBed's `sweep.make_args_list` order: trials, algorithms,
//! test-domain sets, hyperparameter seeds.

use crate::registry::{self, domainbed_algorithm_name, domainbed_dataset_name, Hparam, RegistryVersion};
use anyhow::{bail, Context, Result};
use mgrun_nprand::{seed_hash, PyArg};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// What to sweep over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepOptions {
    /// mgrun `data.dataset` of the base config.
    pub dataset: String,
    /// Domain names in environment-index order.
    pub domains: Vec<String>,
    /// mgrun method names.
    pub algorithms: Vec<String>,
    /// Hyperparameter seeds `n_hparams_from..n_hparams` (seed 0 = the base config's values).
    pub n_hparams_from: u64,
    pub n_hparams: u64,
    /// Trial seeds `0..n_trials` (each reshuffles the in/out splits and redraws hyperparameters).
    pub n_trials: u64,
    /// Also every pair of test domains, as leave-one-domain-out model selection needs.
    pub test_pairs: bool,
    /// Only test-domain sets made of these domain indices (empty: every domain, as DomainBed).
    #[serde(default)]
    pub test_domains: Vec<usize>,
    pub registry: RegistryVersion,
}

/// One training run of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Directory name inside the sweep directory.
    pub name: String,
    /// mgrun method name.
    pub algorithm: String,
    pub test_envs: Vec<usize>,
    pub hparams_seed: u64,
    pub trial_seed: u64,
    /// DomainBed's run seed: `seed_hash(dataset, algorithm, test_envs, hparams_seed, trial_seed)`.
    pub seed: u32,
    pub hparams: Vec<Hparam>,
    /// Config overrides (dotted key, value) applied to the base config, in order.
    pub overrides: Vec<(String, toml::Value)>,
}

/// DomainBed's `all_test_env_combinations`: each domain, followed by its pairs with later domains.
pub fn test_env_sets(n_domains: usize, pairs: bool) -> Result<Vec<Vec<usize>>> {
    if pairs && n_domains < 3 {
        bail!("test-domain pairs need at least 3 domains, the dataset has {n_domains}");
    }
    let mut sets = Vec::new();
    for i in 0..n_domains {
        sets.push(vec![i]);
        if pairs {
            sets.extend((i + 1..n_domains).map(|j| vec![i, j]));
        }
    }
    Ok(sets)
}

/// Every run of the sweep. `base` is the fully resolved base config (its values are the defaults).
pub fn expand(options: &SweepOptions, base: &toml::Table) -> Result<Vec<RunSpec>> {
    if options.domains.len() < 2 {
        bail!("a sweep needs at least 2 domains, dataset {} has {:?}", options.dataset, options.domains);
    }
    if options.algorithms.is_empty() {
        bail!("no algorithms to sweep");
    }
    if options.n_hparams <= options.n_hparams_from || options.n_trials == 0 {
        bail!(
            "empty sweep: hparams seeds {}..{} and {} trials",
            options.n_hparams_from,
            options.n_hparams,
            options.n_trials
        );
    }
    let db_dataset = domainbed_dataset_name(&options.dataset);
    let mut runs = Vec::new();
    for trial_seed in 0..options.n_trials {
        for algorithm in &options.algorithms {
            let wanted = |set: &Vec<usize>| {
                options.test_domains.is_empty() || set.iter().all(|e| options.test_domains.contains(e))
            };
            for test_envs in test_env_sets(options.domains.len(), options.test_pairs)?.into_iter().filter(wanted) {
                for hparams_seed in options.n_hparams_from..options.n_hparams {
                    let hparams = registry::hparams(
                        options.registry,
                        algorithm,
                        &options.dataset,
                        hparams_seed,
                        trial_seed,
                        base,
                    )
                    .with_context(|| format!("hyperparameters of {algorithm}, hparams_seed {hparams_seed}"))?;
                    let seed = seed_hash(&[
                        PyArg::from(db_dataset),
                        PyArg::from(domainbed_algorithm_name(algorithm)),
                        PyArg::IntList(test_envs.iter().map(|&e| e as i64).collect()),
                        PyArg::Int(hparams_seed as i64),
                        PyArg::Int(trial_seed as i64),
                    ]);
                    let test_names: Vec<toml::Value> =
                        test_envs.iter().map(|&e| toml::Value::String(options.domains[e].clone())).collect();
                    let mut overrides = vec![
                        ("method.name".to_string(), toml::Value::String(algorithm.clone())),
                        ("data.test_domains".to_string(), toml::Value::Array(test_names)),
                        ("data.split_seed".to_string(), toml::Value::Integer(trial_seed as i64)),
                        ("train.seed".to_string(), toml::Value::Integer(seed as i64)),
                        ("train.hparams_seed".to_string(), toml::Value::Integer(hparams_seed as i64)),
                    ];
                    overrides.extend(hparams.iter().map(|h| (h.key.clone(), h.value.to_toml())));
                    let envs: Vec<String> = test_envs.iter().map(usize::to_string).collect();
                    runs.push(RunSpec {
                        name: format!("{algorithm}-test{}-hp{hparams_seed:02}-trial{trial_seed}", envs.join("_")),
                        algorithm: algorithm.clone(),
                        test_envs: test_envs.clone(),
                        hparams_seed,
                        trial_seed,
                        seed,
                        hparams,
                        overrides,
                    });
                }
            }
        }
    }
    Ok(runs)
}

impl RunSpec {
    /// The base config with this run's overrides applied.
    pub fn config(&self, base: &toml::Table) -> Result<toml::Table> {
        let mut table = base.clone();
        for (key, value) in &self.overrides {
            set_dotted(&mut table, key, value.clone()).with_context(|| format!("run {}: setting {key}", self.name))?;
        }
        Ok(table)
    }

    /// The run's identity as DomainBed's `args` (the trainer writes the same fields to results.jsonl).
    pub fn args(&self, options: &SweepOptions) -> Value {
        json!({
            "dataset": domainbed_dataset_name(&options.dataset),
            "algorithm": domainbed_algorithm_name(&self.algorithm),
            "test_envs": self.test_envs,
            "hparams_seed": self.hparams_seed,
            "trial_seed": self.trial_seed,
            "seed": self.seed,
        })
    }

    /// DomainBed-named hyperparameters as a JSON object.
    pub fn hparams_json(&self) -> Value {
        Value::Object(self.hparams.iter().map(|h| (h.name.clone(), json!(h.value))).collect())
    }
}

/// Sets `a.b.c = value`, creating intermediate tables.
pub fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((last, parents)) = parts.split_last() else { bail!("empty key") };
    let mut node = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = node.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().with_context(|| format!("`{}` is not a table", parts[..=i].join(".")))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: bool) -> SweepOptions {
        SweepOptions {
            dataset: "pacs".into(),
            domains: ["art_painting", "cartoon", "photo", "sketch"].map(String::from).to_vec(),
            algorithms: vec!["erm".into(), "dsp_reg".into()],
            n_hparams_from: 0,
            n_hparams: 3,
            n_trials: 2,
            test_pairs: pairs,
            test_domains: Vec::new(),
            registry: RegistryVersion::Published,
        }
    }

    #[test]
    fn test_env_sets_follow_domainbed_order() {
        assert_eq!(test_env_sets(3, false).unwrap(), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(
            test_env_sets(3, true).unwrap(),
            vec![vec![0], vec![0, 1], vec![0, 2], vec![1], vec![1, 2], vec![2]]
        );
        assert!(test_env_sets(2, true).is_err());
    }

    #[test]
    fn expansion_counts_names_and_overrides() {
        let base: toml::Table = toml::from_str("[data]\nroot = \"/d\"\n").unwrap();
        let runs = expand(&options(false), &base).unwrap();
        assert_eq!(runs.len(), 2 * 2 * 4 * 3);
        assert_eq!(runs[0].name, "erm-test0-hp00-trial0");
        assert_eq!(runs.last().unwrap().name, "dsp_reg-test3-hp02-trial1");
        let names: std::collections::HashSet<_> = runs.iter().map(|r| r.name.clone()).collect();
        assert_eq!(names.len(), runs.len());
        let config = runs[5].config(&base).unwrap();
        assert_eq!(config["data"]["test_domains"].as_array().unwrap()[0].as_str(), Some("cartoon"));
        assert_eq!(config["data"]["root"].as_str(), Some("/d"));
        assert_eq!(config["train"]["hparams_seed"].as_integer(), Some(2));
        assert_eq!(expand(&options(true), &base).unwrap().len(), 2 * 2 * 10 * 3);
    }

    #[test]
    fn run_seed_is_domainbeds_seed_hash_of_the_args_tuple() {
        let base = toml::Table::new();
        let runs = expand(&options(true), &base).unwrap();
        let run = runs.iter().find(|r| r.test_envs == [0, 2] && r.hparams_seed == 1 && r.trial_seed == 1).unwrap();
        let expected = seed_hash(&[
            PyArg::from("PACS"),
            PyArg::from("ERM"),
            PyArg::IntList(vec![0, 2]),
            PyArg::Int(1),
            PyArg::Int(1),
        ]);
        assert_eq!(run.seed, expected);
    }
}
