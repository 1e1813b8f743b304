//! Collective write on W in-process "ranks" (threads sharing a real rendezvous store), then load:
//! every piece of state round-trips bit for bit, a flipped byte is detected and skipped, an
//! uncommitted directory is invisible, and keep_last prunes.

use mgrun_checkpoint::{CheckpointWriter, Meta, Resume, Snapshot, StateTensor};
use mgrun_collectives::store::{StoreClient, StoreServer};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tch::{Kind, Tensor};

const TOKEN: &str = "test-token";

/// Deterministic pseudo-random values without torch's global generator (tests run in parallel threads).
fn values(n: i64, salt: f64, kind: Kind) -> Tensor {
    (Tensor::arange(n, (Kind::Double, tch::Device::Cpu)) * (0.7311 + salt)).sin().to_kind(kind)
}

fn state(step: u64) -> Vec<StateTensor> {
    let s = step as f64;
    let entry = |name: &str, tensor: Tensor, sharded: bool| StateTensor { name: name.into(), tensor, sharded };
    vec![
        // 1003 elements: not a multiple of any world size used here.
        entry("model.flat", values(1003, s, Kind::Float), true),
        entry("optimizer.adam.exp_avg", values(1003, s + 0.5, Kind::Float), true),
        entry("method.tiny", values(2, s + 0.25, Kind::Float), true),
        entry("model.buffer.bn.running_var", values(12, s + 0.125, Kind::Float).abs().reshape([3, 4]), false),
        entry("model.buffer.bn.num_batches_tracked", Tensor::from_slice(&[17i64]), false),
        entry("optimizer.adam.step", Tensor::from_slice(&[step as i64]), false),
        entry("method.ema", values(5, s + 0.75, Kind::Double), false),
    ]
}

fn meta(step: u64, world_size: usize) -> Meta {
    Meta {
        step,
        world_size,
        seed: 3,
        config_fingerprint: "abc".into(),
        config: BTreeMap::from([("train.lr".to_string(), "0.1".to_string())]),
        created_unix_s: 0,
    }
}

/// Writes the checkpoint of `step` from `world_size` threads, each with its own writer.
fn write_collectively(root: &Path, step: u64, world_size: usize, keep_last: usize) {
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), TOKEN.into()).unwrap();
    let addr = server.addr().to_string();
    std::thread::scope(|scope| {
        for rank in 0..world_size {
            let addr = addr.clone();
            scope.spawn(move || {
                let store =
                    (world_size > 1).then(|| StoreClient::connect(&addr, TOKEN, Duration::from_secs(30)).unwrap());
                let mut writer = CheckpointWriter::new(root, rank, world_size, keep_last, store).unwrap();
                let snapshot = Snapshot::capture(meta(step, world_size), state(step), rank, world_size).unwrap();
                assert_eq!(snapshot.nbytes(), copied_bytes(rank, world_size), "rank {rank} copies only its part");
                writer.save(snapshot).unwrap();
                let report = writer.wait().unwrap().unwrap();
                assert_eq!(report.committed.is_some(), rank == 0);
            });
        }
    });
}

/// Bytes rank `rank` must copy: its range of the sharded tensors, plus the replicated ones on rank 0.
fn copied_bytes(rank: usize, world_size: usize) -> u64 {
    state(0)
        .iter()
        .map(|t| {
            let elem = t.tensor.kind().elt_size_in_bytes() as u64;
            let numel = t.tensor.numel() as u64;
            if t.sharded {
                let (lo, hi) = mgrun_checkpoint::shard_range(numel, rank, world_size);
                (hi - lo) * elem
            } else if rank == 0 {
                numel * elem
            } else {
                0
            }
        })
        .sum()
}

fn assert_same_state(loaded: &mgrun_checkpoint::LoadedCheckpoint, step: u64) {
    let expected = state(step);
    assert_eq!(loaded.tensors.len(), expected.len());
    for e in &expected {
        let got = loaded.get(&e.name).unwrap();
        assert_eq!(got.kind(), e.tensor.kind(), "{}", e.name);
        assert_eq!(got.size(), e.tensor.size(), "{}", e.name);
        assert!(got.equal(&e.tensor), "{} differs after the round trip", e.name);
    }
}

#[test]
fn every_piece_of_state_round_trips_on_any_world_size() {
    for world_size in [1, 3, 4] {
        let dir = tempfile::tempdir().unwrap();
        write_collectively(dir.path(), 5, world_size, 0);
        let step_dir = dir.path().join("step5");
        for rank in 0..world_size {
            assert!(step_dir.join(format!("part-{rank}.safetensors")).is_file());
        }
        assert_eq!(std::fs::read_to_string(dir.path().join("latest")).unwrap().trim(), "step5");
        let loaded = mgrun_checkpoint::load(&step_dir).unwrap();
        assert_eq!(loaded.meta, meta(5, world_size));
        assert_same_state(&loaded, 5);
        // Each rank wrote only its range: the parts together hold each sharded tensor once.
        let part_bytes: u64 = (0..world_size)
            .map(|r| std::fs::metadata(step_dir.join(format!("part-{r}.safetensors"))).unwrap().len())
            .sum();
        assert!(part_bytes < 2 * 1003 * 4 + 2 * 4 + 1000 * world_size as u64, "{part_bytes}");
    }
}

#[test]
fn a_flipped_byte_is_detected_and_auto_resume_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    write_collectively(dir.path(), 2, 3, 0);
    write_collectively(dir.path(), 4, 3, 0);
    let victim = dir.path().join("step4").join("part-1.safetensors");
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();

    let err = format!("{:#}", mgrun_checkpoint::load(&dir.path().join("step4")).err().unwrap());
    assert!(err.contains("part-1.safetensors") && err.contains("checksum"), "{err}");
    let choice = mgrun_checkpoint::resolve_resume(dir.path(), &Resume::Auto).unwrap();
    let loaded = choice.checkpoint.unwrap();
    assert_eq!(loaded.meta.step, 2);
    assert_same_state(&loaded, 2);
    assert_eq!(choice.skipped.len(), 1);
    assert!(choice.skipped[0].contains("step4"), "{:?}", choice.skipped);

    // A flipped byte in the manifest is caught by its own checksum.
    let manifest = dir.path().join("step2").join("manifest.bin");
    let mut bytes = std::fs::read(&manifest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x80;
    std::fs::write(&manifest, bytes).unwrap();
    let choice = mgrun_checkpoint::resolve_resume(dir.path(), &Resume::Auto).unwrap();
    assert!(choice.checkpoint.is_none());
    assert_eq!(choice.skipped.len(), 2);
    assert!(mgrun_checkpoint::resolve_resume(dir.path(), &Resume::Path(dir.path().join("step2"))).is_err());
}

#[test]
fn uncommitted_writes_are_invisible_and_keep_last_prunes() {
    let dir = tempfile::tempdir().unwrap();
    for step in [1, 2, 3] {
        write_collectively(dir.path(), step, 2, 2);
    }
    let steps: Vec<u64> = mgrun_checkpoint::committed_steps(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![3, 2]);
    // A crash before the commit leaves only a .tmp directory (here: one rank's part, no manifest).
    let tmp = dir.path().join(".tmp-step4");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("part-0.safetensors"), b"partial").unwrap();
    let choice = mgrun_checkpoint::resolve_resume(dir.path(), &Resume::Auto).unwrap();
    assert_eq!(choice.checkpoint.unwrap().meta.step, 3);
    assert!(choice.skipped.is_empty());
    let removed = mgrun_checkpoint::clean_incomplete(dir.path()).unwrap();
    assert_eq!(removed, vec![tmp.clone()]);
    assert!(!tmp.exists());
    assert!(mgrun_checkpoint::resolve_resume(dir.path(), &Resume::None).unwrap().checkpoint.is_none());
    let empty = tempfile::tempdir().unwrap();
    assert!(mgrun_checkpoint::resolve_resume(empty.path(), &Resume::Auto).unwrap().checkpoint.is_none());
}
