//! `mgrun bench scaling --cpus 1,2,4 CONFIG`: weak and strong scaling of real training jobs.
//!
//! Every point is a job of this `mgrun` (`--cpus W`, quiet), `2 S` steps with an evaluation after
//! step `S`: the first `S` steps warm up, and the numbers are the second window's, read back from
//! the job's `metrics.jsonl` (every rank's step-time breakdown, evaluation excluded).
//! - **Weak scaling**: fixed images per rank: `data.batch_per_domain` is the config's times W.
//! - **Strong scaling**: fixed global batch: the config's `data.batch_per_domain` at every W.
//!
//! Efficiency is images/s at W over W times images/s at 1 rank (same mode and method); "img/s vs 1
//! rank" is the plain speed-up. On one machine the ranks share its cores (the launcher gives each
//! `cores / W` threads), so the ideal there is a speed-up of 1 (the same cores, split): CPU scaling
//! shows the cost of communication and of splitting the batch, not added compute.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, clap::Args)]
pub struct ScalingArgs {
    /// World sizes of CPU ranks, comma-separated.
    #[arg(long, value_name = "W,W,...", default_value = "1,2,4")]
    pub cpus: String,
    /// Methods (`method.name`), comma-separated.
    #[arg(long, default_value = "erm,dsp_reg,sam")]
    pub methods: String,
    /// `weak`, `strong` or both.
    #[arg(long, default_value = "weak,strong")]
    pub modes: String,
    /// Steps per measured window (the job runs twice as many: the first window warms up).
    #[arg(long, value_name = "S", default_value_t = 20)]
    pub steps: u64,
    /// Also run every multi-rank point with `comm.overlap = false` (the overlap gain, same config).
    #[arg(long)]
    pub overlap_off: bool,
    /// Where the jobs, `scaling.json` and `scaling.md` go [default: runs/bench-scaling-<time>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Config override `a.b=value` for every job; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The job's TOML config (its batch per domain is the per-rank batch of weak scaling and the
    /// global batch of strong scaling).
    pub config: PathBuf,
}

/// One measured job.
#[derive(Debug, Clone)]
struct Point {
    mode: &'static str,
    method: String,
    world: usize,
    overlap: bool,
    images_per_step: usize,
    /// Means over ranks of the measured window.
    step_ms: f64,
    data_wait_ms: f64,
    forward_backward_ms: f64,
    comm_ms: f64,
    comm_overlapped_ms: f64,
    optimizer_ms: f64,
    /// The job's images per second: images per step over the slowest rank's mean step time.
    images_per_s: f64,
}

pub fn run(args: &ScalingArgs) -> Result<i32> {
    let worlds: Vec<usize> = parse_list(&args.cpus, "--cpus")?;
    let methods: Vec<String> =
        args.methods.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect();
    let modes: Vec<&'static str> = args
        .modes
        .split(',')
        .map(|m| match m.trim() {
            "weak" => Ok("weak"),
            "strong" => Ok("strong"),
            other => bail!("--modes: expected weak and/or strong, got {other:?}"),
        })
        .collect::<Result<_>>()?;
    anyhow::ensure!(args.steps >= 2, "--steps: at least 2 steps per window");
    let job = mgrun_trainer::JobConfig::load(&args.config, &args.overrides)
        .with_context(|| format!("bench scaling: config {}", args.config.display()))?;
    let base_batch = job.data.batch_per_domain;
    let out = args.out.clone().unwrap_or_else(|| crate::launch::default_out_dir("bench-scaling"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let exe = std::env::current_exe().context("finding the mgrun executable")?;
    println!(
        "bench scaling: {} ({} {}), world sizes {worlds:?}, methods {methods:?}, {} measured steps after {} warm-up \
         steps per job; jobs in {}",
        args.config.display(),
        job.model.arch,
        job.data.dataset,
        args.steps,
        args.steps,
        out.display()
    );
    let mut points = Vec::new();
    for &mode in &modes {
        for method in &methods {
            for &world in &worlds {
                let overlaps: &[bool] = if args.overlap_off && world > 1 { &[true, false] } else { &[true] };
                for &overlap in overlaps {
                    let batch = if mode == "weak" { base_batch * world } else { base_batch };
                    let name = format!("{mode}-{method}-w{world}{}", if overlap { "" } else { "-no-overlap" });
                    let run_dir = out.join(&name);
                    let mut sets = args.overrides.clone();
                    sets.extend([
                        format!("method.name=\"{method}\""),
                        format!("data.batch_per_domain={batch}"),
                        format!("train.steps={}", 2 * args.steps),
                        format!("eval.every_steps={}", args.steps),
                        "checkpoint.every_steps=0".to_string(),
                        format!("comm.overlap={overlap}"),
                    ]);
                    run_job(&exe, world, &run_dir, &args.config, &sets)?;
                    let point = read_point(&run_dir, mode, method, world, overlap)
                        .with_context(|| format!("reading the metrics of {}", run_dir.display()))?;
                    println!(
                        "  {name}: {:.0} img/s, step {:.1} ms (comm {:.1} ms waited, {:.1} ms overlapped)",
                        point.images_per_s, point.step_ms, point.comm_ms, point.comm_overlapped_ms
                    );
                    points.push(point);
                }
            }
        }
    }
    let table = markdown(&points);
    println!("\n{table}");
    let json_path = out.join("scaling.json");
    let rows: Vec<Value> = points.iter().map(|p| point_json(p, &points)).collect();
    std::fs::write(&json_path, serde_json::to_vec_pretty(&json!({"config": args.config, "points": rows}))?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = out.join("scaling.md");
    std::fs::write(&md_path, &table).with_context(|| format!("writing {}", md_path.display()))?;
    println!("written: {} and {}", json_path.display(), md_path.display());
    let figures: Vec<crate::plot::ScalingPoint> = points
        .iter()
        .map(|p| crate::plot::ScalingPoint {
            mode: p.mode.to_string(),
            series: if p.overlap || p.world == 1 { p.method.clone() } else { format!("{} no overlap", p.method) },
            ranks: p.world,
            images_per_s: p.images_per_s,
            efficiency: efficiency(p, &points),
            phase_ms: [p.data_wait_ms, p.forward_backward_ms, p.comm_ms, p.optimizer_ms],
        })
        .collect();
    for file in crate::plot::scaling_figures(&figures, &out)? {
        println!("written: {}", file.display());
    }
    Ok(0)
}

fn parse_list(text: &str, what: &str) -> Result<Vec<usize>> {
    let values: Vec<usize> = text
        .split(',')
        .map(|w| w.trim().parse::<usize>().with_context(|| format!("{what}: {w:?} is not a number of ranks")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(values.iter().all(|&w| w >= 1), "{what}: world sizes start at 1");
    Ok(values)
}

fn run_job(exe: &Path, world: usize, run_dir: &Path, config: &Path, sets: &[String]) -> Result<()> {
    let mut command = Command::new(exe);
    command.args(["--cpus", &world.to_string(), "--quiet", "--overwrite", "--out"]).arg(run_dir);
    for set in sets {
        command.args(["--set", set]);
    }
    command.arg(config);
    let output = command.output().with_context(|| format!("starting {}", exe.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(8).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("the job in {} failed ({}):\n{}", run_dir.display(), output.status, tail.join("\n"));
    }
    Ok(())
}

/// The last evaluation window of the run's `metrics.jsonl`.
fn read_point(run_dir: &Path, mode: &'static str, method: &str, world: usize, overlap: bool) -> Result<Point> {
    let path = run_dir.join(mgrun_trainer::records::METRICS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let last =
        text.lines().rev().find(|l| !l.trim().is_empty()).with_context(|| format!("{} is empty", path.display()))?;
    let record: Value = serde_json::from_str(last).with_context(|| format!("{}: the last line", path.display()))?;
    let ranks = record["ranks"].as_array().with_context(|| format!("{}: no \"ranks\"", path.display()))?;
    anyhow::ensure!(ranks.len() == world, "{}: {} ranks recorded, expected {world}", path.display(), ranks.len());
    let mean = |key: &str| ranks.iter().filter_map(|r| r[key].as_f64()).sum::<f64>() / ranks.len() as f64;
    let slowest = ranks.iter().filter_map(|r| r["step_ms"].as_f64()).fold(0.0, f64::max);
    let config_text = std::fs::read_to_string(run_dir.join("config.resolved.toml"))
        .with_context(|| format!("reading {}/config.resolved.toml", run_dir.display()))?;
    let resolved: mgrun_trainer::JobConfig = toml::from_str(&config_text).context("config.resolved.toml")?;
    let results = std::fs::read_to_string(run_dir.join("results.jsonl")).unwrap_or_default();
    let train_domains = results
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .and_then(|r| {
            let all = r["args"]["domains"].as_array()?.len();
            let test = r["args"]["test_envs"].as_array()?.len();
            Some(all - test)
        })
        .context("results.jsonl: the run's domains")?;
    let images_per_step = resolved.data.batch_per_domain * train_domains;
    Ok(Point {
        mode,
        method: method.to_string(),
        world,
        overlap,
        images_per_step,
        step_ms: mean("step_ms"),
        data_wait_ms: mean("data_wait_ms"),
        forward_backward_ms: mean("forward_backward_ms"),
        comm_ms: mean("comm_ms"),
        comm_overlapped_ms: mean("comm_overlapped_ms"),
        optimizer_ms: mean("optimizer_ms"),
        images_per_s: images_per_step as f64 / (slowest / 1e3).max(1e-12),
    })
}

/// Images/s at W over W times images/s at one rank, for the same mode, method and overlap.
fn efficiency(point: &Point, all: &[Point]) -> Option<f64> {
    let one = all.iter().find(|p| p.mode == point.mode && p.method == point.method && p.world == 1)?;
    Some(point.images_per_s / (point.world as f64 * one.images_per_s))
}

fn point_json(p: &Point, all: &[Point]) -> Value {
    json!({
        "mode": p.mode, "method": p.method, "world_size": p.world, "overlap": p.overlap,
        "images_per_step": p.images_per_step, "images_per_s": p.images_per_s,
        "images_per_s_per_rank": p.images_per_s / p.world as f64, "efficiency": efficiency(p, all),
        "step_ms": p.step_ms, "data_wait_ms": p.data_wait_ms, "forward_backward_ms": p.forward_backward_ms,
        "comm_ms": p.comm_ms, "comm_overlapped_ms": p.comm_overlapped_ms, "optimizer_ms": p.optimizer_ms,
    })
}

fn markdown(points: &[Point]) -> String {
    let mut out = String::from(
        "| mode | method | ranks | overlap | images/step | img/s | img/s per rank | efficiency | img/s vs 1 rank | step ms | \
         data wait | fwd+bwd | comm waited | comm overlapped | optimizer |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for p in points {
        let eff = efficiency(p, points);
        let (eff, speedup) = match eff {
            Some(e) => (format!("{:.0}%", e * 100.0), format!("{:.2}x", e * p.world as f64)),
            None => ("-".to_string(), "-".to_string()),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            p.mode,
            p.method,
            p.world,
            if p.world == 1 {
                "-"
            } else if p.overlap {
                "on"
            } else {
                "off"
            },
            p.images_per_step,
            p.images_per_s,
            p.images_per_s / p.world as f64,
            eff,
            speedup,
            p.step_ms,
            p.data_wait_ms,
            p.forward_backward_ms,
            p.comm_ms,
            p.comm_overlapped_ms,
            p.optimizer_ms,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(world: usize, images_per_s: f64) -> Point {
        Point {
            mode: "strong",
            method: "erm".into(),
            world,
            overlap: true,
            images_per_step: 96,
            step_ms: 10.0,
            data_wait_ms: 0.0,
            forward_backward_ms: 8.0,
            comm_ms: 1.0,
            comm_overlapped_ms: 0.5,
            optimizer_ms: 1.0,
            images_per_s,
        }
    }

    #[test]
    fn efficiency_is_relative_to_one_rank_of_the_same_series() {
        let points = [point(1, 100.0), point(2, 150.0), point(4, 200.0)];
        assert_eq!(efficiency(&points[1], &points), Some(0.75));
        assert_eq!(efficiency(&points[2], &points), Some(0.5));
        assert!(markdown(&points).contains("| strong | erm | 4 | on | 96 | 200 | 50 | 50% | 2.00x |"));
        assert!(parse_list("1,x", "--cpus").is_err());
    }
}
