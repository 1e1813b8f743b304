//! Mixup's pieces that the reference test cannot see: the 8-bit transport reproduces the loader's
//! normalised images bit for bit, and the pair draws form one cycle over the domains.

use mgrun_data::transforms::{normalize_into, IMAGENET_MEAN, IMAGENET_STD};
use mgrun_methods::mixup::{from_pixels, pair_draws, to_pixels, NORMALIZATION_MEAN, NORMALIZATION_STD};
use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

#[test]
fn uint8_transport_reproduces_the_loaders_images_bit_for_bit() {
    assert_eq!(NORMALIZATION_MEAN, IMAGENET_MEAN);
    assert_eq!(NORMALIZATION_STD, IMAGENET_STD);
    let (height, width) = (13, 17);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..4 {
        // Every value 0..=255 appears in each channel, plus random ones.
        let mut rgb: Vec<u8> = (0..3 * height * width).map(|_| rng.gen()).collect();
        for (i, value) in rgb.iter_mut().take(3 * 256).enumerate() {
            *value = (i / 3) as u8;
        }
        let mut normalised = vec![0f32; rgb.len()];
        normalize_into(&rgb, &mut normalised);
        let x = Tensor::from_slice(&normalised).view([1, 3, height as i64, width as i64]);
        let pixels = to_pixels(&x).unwrap();
        let expected = Tensor::from_slice(&rgb).view([height as i64, width as i64, 3]).permute([2, 0, 1]).unsqueeze(0);
        assert!(pixels.equal(&expected), "the 8-bit pixels are not the loader's");
        let back = from_pixels(&pixels).unwrap();
        assert_eq!(back.kind(), Kind::Float);
        assert!(back.equal(&x), "re-normalised pixels differ from the loader's values");
    }
    // Images that are not 8-bit pixels do not survive the round trip (the method refuses them).
    let x = Tensor::from_slice(&[0.1234f32; 12]).view([1, 3, 2, 2]);
    assert!(!from_pixels(&to_pixels(&x).unwrap()).unwrap().equal(&x));
}

#[test]
fn pair_draws_are_one_cycle_of_the_domains_from_the_seed_and_step() {
    for domains in [1, 2, 3, 5] {
        let draws = pair_draws(7, 3, domains, 0.2).unwrap();
        assert_eq!(draws, pair_draws(7, 3, domains, 0.2).unwrap(), "not a function of (seed, step)");
        let mut sorted = draws.perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..domains).collect::<Vec<_>>());
        // Following partners from any domain visits every domain once (DomainBed's ring of pairs).
        let mut seen = vec![false; domains];
        let mut at = draws.perm[0];
        for _ in 0..domains {
            assert!(!seen[at]);
            seen[at] = true;
            at = draws.partner[at];
        }
        assert_eq!(at, draws.perm[0]);
        assert!(draws.lambda.iter().all(|l| (0.0..=1.0).contains(l)));
    }
    let steps: Vec<Vec<f64>> = (0..4).map(|s| pair_draws(7, s, 3, 0.2).unwrap().lambda).collect();
    assert!(steps.windows(2).all(|w| w[0] != w[1]), "the draws must change with the step");
    assert_ne!(pair_draws(8, 0, 3, 0.2).unwrap().lambda, steps[0], "the draws must change with the seed");
}
