//! The training loader (sharding invariance, ordering, augmentation) and evaluation batches.

mod common;

use common::{config, small_synthetic, touch, write_png};
use mgrun_data::image_io::decode_rgb;
use mgrun_data::transforms::{normalize_into, train_transform, AugmentParams};
use mgrun_data::{load_eval_batch, step_sample, DataConfig, Dataset, Loader, ShardSpec};
use std::sync::Arc;
use tch::Tensor;

const B: usize = 32;

fn spec(domain: usize, lo: usize, hi: usize) -> ShardSpec {
    ShardSpec { train_domain: domain, domain, lo, hi }
}

/// Steps `start..start+n` of `shards`, as (x, y) per shard per step.
fn load_steps(
    ds: &Arc<Dataset>,
    cfg: &DataConfig,
    shards: Vec<ShardSpec>,
    start: u64,
    n: u64,
) -> Vec<Vec<(Tensor, Tensor)>> {
    let mut loader = Loader::new(ds.clone(), shards, cfg, 11, start).unwrap();
    (0..n)
        .map(|i| {
            let batch = loader.next().unwrap();
            assert_eq!(batch.step, start + i);
            batch.shards.into_iter().map(|s| (s.x, s.y)).collect()
        })
        .collect()
}

#[test]
fn sharded_slices_concatenate_to_the_whole_batch() {
    let dir = small_synthetic(6, 16);
    let cfg = DataConfig { batch_per_domain: B, num_workers: 2, prefetch: 2, ..config(dir.path(), 16) };
    let ds = Arc::new(Dataset::open(&cfg).unwrap());
    let whole = load_steps(&ds, &cfg, vec![spec(0, 0, B), spec(3, 0, B)], 5, 3);
    let low = load_steps(&ds, &cfg, vec![spec(0, 0, 16), spec(3, 0, 16)], 5, 3);
    // Another "rank", with other loader settings and no image cache.
    let uncached = Arc::new(Dataset::open(&DataConfig { cache_mb: 0, ..cfg.clone() }).unwrap());
    let other = DataConfig { num_workers: 3, prefetch: 1, cache_mb: 0, ..cfg.clone() };
    let high = load_steps(&uncached, &other, vec![spec(0, 16, B), spec(3, 16, B)], 5, 3);
    for step in 0..3 {
        for shard in 0..2 {
            let (x, y) = &whole[step][shard];
            assert_eq!(x.size(), [B as i64, 3, 16, 16]);
            assert_eq!(x.kind(), tch::Kind::Float);
            assert_eq!(y.kind(), tch::Kind::Int64);
            let x_cat = Tensor::cat(&[&low[step][shard].0, &high[step][shard].0], 0);
            let y_cat = Tensor::cat(&[&low[step][shard].1, &high[step][shard].1], 0);
            assert!(x.equal(&x_cat), "step {step} shard {shard}: pixels differ");
            assert!(y.equal(&y_cat), "step {step} shard {shard}: labels differ");
        }
    }
    // Different steps and domains really load different batches.
    assert!(!whole[0][0].0.equal(&whole[1][0].0));
    assert!(!whole[0][0].0.equal(&whole[0][1].0));
}

#[test]
fn steps_come_in_order_from_start_step_and_resume_identically() {
    let dir = small_synthetic(4, 8);
    let cfg = DataConfig { batch_per_domain: 4, num_workers: 3, prefetch: 2, ..config(dir.path(), 8) };
    let ds = Arc::new(Dataset::open(&cfg).unwrap());
    let mut loader = Loader::new(ds.clone(), vec![spec(1, 0, 4)], &cfg, 11, 0).unwrap();
    let mut from_zero = Vec::new();
    for expected in 0..10u64 {
        let batch = loader.next().unwrap();
        assert_eq!(batch.step, expected);
        assert_eq!(batch.shards.len(), 1);
        assert_eq!(batch.shards[0].train_domain, 1);
        from_zero.push(batch.shards[0].x.shallow_clone());
    }
    drop(loader);
    // A run resumed at step 7 sees the same pixels for steps 7, 8, 9.
    let resumed = load_steps(&ds, &cfg, vec![spec(1, 0, 4)], 7, 3);
    for (i, step) in resumed.iter().enumerate() {
        assert!(step[0].0.equal(&from_zero[7 + i]), "step {}", 7 + i);
    }
}

#[test]
fn labels_follow_the_sampler_and_pixels_are_the_seeded_domainbed_augmentation() {
    let dir = small_synthetic(6, 16);
    let cfg = DataConfig { batch_per_domain: B, ..config(dir.path(), 16) };
    let ds = Arc::new(Dataset::open(&cfg).unwrap());
    let domain = &ds.domains()[2];
    let step = 4;
    let batch = load_steps(&ds, &cfg, vec![spec(2, 0, B)], step, 1).remove(0).remove(0);
    let picks = step_sample(11, 2, step, B, domain.in_split.len());
    let files: Vec<usize> = picks.iter().map(|&p| domain.in_split[p]).collect();
    let expected_labels: Vec<i64> = files.iter().map(|&f| domain.labels[f]).collect();
    assert_eq!(Vec::<i64>::try_from(&batch.1).unwrap(), expected_labels);

    // Each image is the training transform with the parameters of (seed 11, domain 2, step, position).
    let (plain, _) = load_eval_batch(&ds, 2, &files, 16).unwrap();
    let mut differs_from_eval = 0;
    for (position, &file) in files.iter().enumerate() {
        let source = decode_rgb(&domain.files[file]).unwrap();
        let params = AugmentParams::sample(11, 2, step, position, source.width(), source.height());
        let mut expected = vec![0f32; 3 * 16 * 16];
        normalize_into(&train_transform(&source, &params, 16), &mut expected);
        let got = Vec::<f32>::try_from(&batch.0.get(position as i64).flatten(0, -1)).unwrap();
        assert_eq!(got, expected, "image {position}");
        differs_from_eval += usize::from(!batch.0.get(position as i64).equal(&plain.get(position as i64)));
    }
    assert!(differs_from_eval >= B - 2, "only {differs_from_eval} of {B} images are augmented");

    // Without augmentation the training images are exactly the eval images.
    let no_aug = DataConfig { augment: false, ..cfg.clone() };
    let batch = load_steps(&ds, &no_aug, vec![spec(2, 0, B)], step, 1).remove(0).remove(0);
    assert!(batch.0.equal(&plain));
}

#[test]
fn eval_batch_shapes_labels_and_normalisation() {
    let dir = small_synthetic(3, 16);
    let ds = Dataset::open(&config(dir.path(), 16)).unwrap();
    let domain = &ds.domains()[0];
    let indices: Vec<usize> = domain.out_split.clone();
    let (x, y) = load_eval_batch(&ds, 0, &indices, 16).unwrap();
    assert_eq!(x.size(), [indices.len() as i64, 3, 16, 16]);
    let expected: Vec<i64> = indices.iter().map(|&i| domain.labels[i]).collect();
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), expected);
    // Normalised values lie within [(0 - mean) / std, (1 - mean) / std].
    let (min, max) = (x.min().double_value(&[]), x.max().double_value(&[]));
    assert!(min >= -2.12 && max <= 2.65, "{min} {max}");
    // A different size (not the cached one) resizes on the fly.
    let (small, _) = load_eval_batch(&ds, 0, &indices[..2], 8).unwrap();
    assert_eq!(small.size(), [2, 3, 8, 8]);
    // Many images go through several decoding threads and keep their order.
    let all: Vec<usize> = (0..domain.len()).collect();
    let (x_all, _) = load_eval_batch(&ds, 0, &all, 16).unwrap();
    for (row, &i) in indices.iter().enumerate() {
        assert!(x_all.get(i as i64).equal(&x.get(row as i64)));
    }
    let (empty, empty_y) = load_eval_batch(&ds, 0, &[], 16).unwrap();
    assert_eq!((empty.size(), empty_y.size()), (vec![0, 3, 16, 16], vec![0]));
    let msg = load_eval_batch(&ds, 0, &[10_000], 16).unwrap_err().to_string();
    assert!(msg.contains("out of range for domain 'noisy'"), "{msg}");
}

#[test]
fn corrupt_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_png(&root.join("good/a/1.png"), 8, 1);
    let bad = touch(&root.join("bad/a/broken.jpg"), b"\xFF\xD8\xFF\xE0 definitely not a jpeg");
    let cfg = DataConfig { batch_per_domain: 4, ..config(root, 8) };
    let ds = Arc::new(Dataset::open(&cfg).unwrap());
    let bad_domain = ds.domain_index("bad").unwrap();
    let bad_path = ds.domains()[bad_domain].files[0].clone();
    assert_eq!(bad_path.file_name(), bad.file_name());

    let msg = format!("{:#}", load_eval_batch(&ds, bad_domain, &[0], 8).unwrap_err());
    assert!(msg.contains(&bad_path.display().to_string()), "{msg}");

    let mut loader = Loader::new(ds.clone(), vec![spec(bad_domain, 0, 4)], &cfg, 0, 0).unwrap();
    let msg = format!("{:#}", loader.next().unwrap_err());
    assert!(msg.contains("step 0") && msg.contains(&bad_path.display().to_string()), "{msg}");
    // The loader stays failed instead of skipping the step.
    assert!(loader.next().is_err());
}

#[test]
fn bad_shards_are_rejected() {
    let dir = small_synthetic(2, 8);
    let cfg = DataConfig { batch_per_domain: 8, ..config(dir.path(), 8) };
    let ds = Arc::new(Dataset::open(&cfg).unwrap());
    let msg = Loader::new(ds.clone(), vec![spec(0, 4, 9)], &cfg, 0, 0).err().unwrap().to_string();
    assert!(msg.contains("slice [4, 9)") && msg.contains("data.batch_per_domain"), "{msg}");
    let msg = Loader::new(ds.clone(), vec![spec(9, 0, 8)], &cfg, 0, 0).err().unwrap().to_string();
    assert!(msg.contains("domain index 9 out of range"), "{msg}");
}
