//! `[metrics] prometheus = "HOST:PORT"`: every rank serves its own metrics for scraping on
//! PORT + local rank, labelled with its global rank and node. One endpoint per rank (not one per
//! node aggregated by the launcher) keeps a rank's numbers its own and leaves aggregation to
//! Prometheus (`sum by (node)`, `max by (rank)`), which also sees a stalled rank stop answering.

use anyhow::{Context, Result};
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::{SocketAddr, ToSocketAddrs};

/// The address rank `local_rank` of a node serves on: `base`'s port plus the local rank.
pub fn rank_address(base: &str, local_rank: usize) -> Result<SocketAddr> {
    let mut address = base
        .to_socket_addrs()
        .with_context(|| format!("metrics.prometheus = {base:?}: not a HOST:PORT address"))?
        .next()
        .with_context(|| format!("metrics.prometheus = {base:?}: the host resolves to no address"))?;
    let port = address.port() as usize + local_rank;
    let port = u16::try_from(port).ok().with_context(|| {
        format!("metrics.prometheus = {base:?}: port {} + local rank {local_rank} is past 65535", address.port())
    })?;
    address.set_port(port);
    Ok(address)
}

/// Installs the process's metrics recorder with an HTTP listener on `address` (a background thread
/// of the exporter's own), every metric labelled with `rank` and `node`.
pub fn serve(address: SocketAddr, rank: usize, node: usize) -> Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(address)
        .add_global_label("rank", rank.to_string())
        .add_global_label("node", node.to_string())
        .install()
        .with_context(|| format!("rank {rank}: serving metrics on {address} (metrics.prometheus)"))?;
    describe();
    Ok(())
}

/// HELP lines for the metrics a scrape shows.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("mgrun_steps_total", "Training steps finished by this rank");
    describe_histogram!("mgrun_step_seconds", Unit::Seconds, "Wall time of a training step");
    describe_histogram!(
        "mgrun_step_phase_seconds",
        Unit::Seconds,
        "Time of a step's phases: data_wait, forward_backward, comm (waited for), optimizer"
    );
    describe_histogram!(
        "mgrun_comm_overlapped_seconds",
        Unit::Seconds,
        "Communication of a step that ran alongside backward"
    );
    describe_histogram!("mgrun_comm_seconds", Unit::Seconds, "Time of one collective, by kind");
    describe_counter!("mgrun_comm_bytes_total", Unit::Bytes, "Bytes of this rank's tensors passed to collectives");
    describe_gauge!("mgrun_images_per_second", "Images per second this rank computed in its last step");
    describe_gauge!("mgrun_loss", "The job's training loss at the last step");
    describe_gauge!("mgrun_grad_norm", "L2 norm of the gradient the optimizer applied at the last step");
    describe_gauge!("mgrun_method_stat", "A method's per-step scalar (SAM's perturbation norm, DSP-Reg's lambda ...)");
    describe_gauge!("mgrun_method_summary", "A method's summary at the last evaluation (DSP-Reg sensitivity ...)");
    describe_gauge!("mgrun_loader_queue_depth", "Batches ready in the loader's queues when a step took one");
    describe_gauge!("mgrun_host_rss_bytes", Unit::Bytes, "Resident memory of the rank's process");
    describe_gauge!("mgrun_gpu_memory_bytes", Unit::Bytes, "CUDA memory allocated by the rank (peak since start)");
    describe_histogram!("mgrun_evaluation_seconds", Unit::Seconds, "Time of one evaluation");
    describe_histogram!(
        "mgrun_checkpoint_stall_seconds",
        Unit::Seconds,
        "Time the loop waited for a checkpoint (the write runs in the background)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_of_a_node_get_consecutive_ports() {
        assert_eq!(rank_address("127.0.0.1:9400", 3).expect("address").port(), 9403);
        let error = rank_address("127.0.0.1:65535", 1).expect_err("past the last port").to_string();
        assert!(error.contains("past 65535"), "{error}");
        let error = rank_address("no-port", 0).expect_err("no port").to_string();
        assert!(error.contains("metrics.prometheus"), "{error}");
    }
}
