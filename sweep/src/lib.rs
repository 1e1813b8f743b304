//! DomainBed's sweep and result tables for mgrun.
//!
//! - [`registry`]: DomainBed's random hyperparameter search (bit-identical draws through
//!   `mgrun-nprand`), mapped onto mgrun config keys.
//! - [`plan`]: the sweep's runs (test domains, optional pairs, hparams seeds, trials, run seeds).
//! - [`jobs`]: run directories, local sequential runs with `done` markers, Slurm job arrays that
//!   survive preemption and requeue.
//! - [`estimate`]: the cost model and table of `mgrun sweep --estimate`.
//! - [`collect`]: records, the three model-selection methods and the markdown/LaTeX tables.

pub mod collect;
pub mod estimate;
pub mod jobs;
pub mod plan;
pub mod registry;

pub use collect::{
    load_records, render_latex, render_markdown, select_models, tables, Record, Selection, SelectionTables,
};
pub use estimate::{Estimate, Resource, RunCost};
pub use jobs::{run_locally, slurm_script, write_sweep, Launcher, RunState, SlurmOptions, WrittenRun};
pub use plan::{expand, RunSpec, SweepOptions};
pub use registry::{domainbed_algorithm_name, domainbed_dataset_name, hparams, HValue, Hparam, RegistryVersion};
