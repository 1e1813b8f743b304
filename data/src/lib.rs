//! Datasets, splits, samplers, loading and synthetic data for mgrun.
//!
//! A dataset is a DomainBed-style tree `root/<domain>/<class>/<image>.{jpg,jpeg,png}`. [`Dataset::open`]
//! scans it once, assigns one global class list and makes a seeded in/out split per domain. Training batches
//! come from [`Loader`], which draws every domain's per-step minibatch as a pure function of
//! `(seed, domain, step)` ([`step_sample`]) so that any sharding of a step over ranks sees the same images
//! and pixels. [`synthetic::generate`] writes a small learnable multi-domain dataset of real JPEG files.

pub mod config;
pub mod dataset;
pub mod digits;
pub mod image_io;
pub mod inspect;
pub mod loader;
pub mod registry;
pub mod sampler;
pub mod split;
pub mod synthetic;
pub mod transforms;

pub use config::{DataConfig, OnCorrupt, SplitKind};
pub use dataset::{Dataset, Domain};
pub use loader::{bench_loader, load_eval_batch, Loader, LoaderBench, ShardBatch, ShardSpec, StepBatch};
pub use sampler::step_sample;
pub use split::{split_in_out, split_seed_hash};
