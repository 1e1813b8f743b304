//! The standing fault-injection suite: hostile and careless invocations as a new user makes them, one
//! module per family. Every case asserts the exit status, the time to exit, a message naming the
//! culprit (file, key, path, rank or option), that no process is left behind and that no file of an
//! earlier run is lost or changed.
//!
//! - `config`: bad configs and options, refused before any rank starts.
//! - `data`: broken dataset trees (unreadable images, missing classes, symlink cycles).
//! - `run_dir`: run directories and resuming (locks, finished runs, another run's checkpoint).
//! - `checkpoint_damage`: truncated, flipped and missing checkpoint files.
//! - `signals`: signals to the launcher and killed or stopped ranks.
//! - `store`: connections to the job's rendezvous store and ring ports that are not the job's.
//! - `kill_campaign`: SIGKILLs at random instants across checkpoint writes, resumes and evaluations.

mod checkpoint_damage;
mod config;
mod data;
mod harness;
mod kill_campaign;
mod run_dir;
mod signals;
mod store;
