//! The hand-written input gradient against central finite differences, for the network part
//! (pre- and post-ReLU objectives, through ReLUs and pools) and for the full objective with
//! the regularizers.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use vgg_atlas_proto::{Layer, Objective, Preset, Settings};
use vgg_atlas_worker::engine::conv;
use vgg_atlas_worker::engine::cpu_trunk::CpuTrunk;
use vgg_atlas_worker::engine::host_images::{pixel_gradient, regularizers};
use vgg_atlas_worker::engine::transform::Affine;
use vgg_atlas_worker::engine::trunk::Trunk;

const SIZE: usize = 16;

/// Objective of image b (the target minus the regularizers, if `s` has them) for pixels `x`
/// of `size` x `size`.
fn objective(
    trunk: &mut CpuTrunk,
    layer: Layer,
    filters: &[usize],
    x: &[f32],
    obj: Objective,
    s: &Settings,
    size: usize,
) -> Vec<f64> {
    let pre = weights().preprocess.channels();
    let n = size * size * 3;
    let input: Vec<f32> = x
        .chunks_exact(3)
        .flat_map(|p| pre.map(|(src, scale, off)| scale * p[src] + off))
        .collect();
    let scores = trunk
        .run(layer, filters, size, size, &input, obj, None)
        .unwrap();
    scores
        .iter()
        .enumerate()
        .map(|(b, sc)| {
            let t = if obj == Objective::PreRelu {
                sc.pre
            } else {
                sc.post
            } as f64;
            t - regularizers(&x[b * n..(b + 1) * n], size, s).0
        })
        .collect()
}

fn check(layer: &str, obj: Objective, s: &Settings) {
    // Small: ReLUs and pools switch inside larger intervals (the error grows linearly with h);
    // along the gradient the difference still stands far above f32 rounding.
    check_h(layer, obj, s, 0.01, SIZE)
}

/// Checks the gradient of image side `size` along the gradient itself, with step `h`.
fn check_h(layer: &str, obj: Objective, s: &Settings, h: f32, size: usize) {
    let layer = Layer::by_name(layer).unwrap();
    let filters = [3usize, 7];
    let n = size * size * 3;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    // A smooth image plus mild noise: pure noise puts many max-pool inputs near a tie.
    let x: Vec<f32> = (0..2 * n)
        .map(|i| {
            let (p, c) = ((i % n) / 3, i % 3);
            let (y, xx) = ((p / size) as f32, (p % size) as f32);
            128.0
                + 60.0 * (xx / 3.0 + c as f32).sin() * (y / 4.0 - i as f32 / n as f32).cos()
                + rng.random::<f32>() * 8.0
        })
        .collect();
    let mut trunk = CpuTrunk::new(weights());
    pool().install(|| {
        let pre = weights().preprocess.channels();
        let input: Vec<f32> = x
            .chunks_exact(3)
            .flat_map(|p| pre.map(|(src, scale, off)| scale * p[src] + off))
            .collect();
        let mut g = vec![0.0f32; 2 * n];
        trunk
            .run(layer, &filters, size, size, &input, obj, Some(&mut g))
            .unwrap();
        let grads: Vec<Vec<f64>> = (0..2)
            .map(|b| {
                pixel_gradient(
                    &g[b * n..(b + 1) * n],
                    &regularizers(&x[b * n..(b + 1) * n], size, s).1,
                    &pre,
                    &Affine::IDENTITY,
                    size,
                )
            })
            .collect();
        // Directional derivative along each image's own gradient (RMS-normalised), the
        // direction of largest change, against central differences.
        let v: Vec<f32> = grads
            .iter()
            .flat_map(|g| {
                let rms = (g.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
                g.iter().map(move |v| (v / rms) as f32)
            })
            .collect();
        let plus: Vec<f32> = x.iter().zip(&v).map(|(a, d)| a + h * d).collect();
        let minus: Vec<f32> = x.iter().zip(&v).map(|(a, d)| a - h * d).collect();
        let (fp, fm) = (
            objective(&mut trunk, layer, &filters, &plus, obj, s, size),
            objective(&mut trunk, layer, &filters, &minus, obj, s, size),
        );
        for b in 0..2 {
            let numeric = (fp[b] - fm[b]) / (2.0 * h as f64);
            let analytic: f64 = grads[b]
                .iter()
                .zip(&v[b * n..(b + 1) * n])
                .map(|(g, d)| g * *d as f64)
                .sum();
            let err = (numeric - analytic).abs() / analytic.abs().max(1e-6);
            assert!(
                err < 2e-2,
                "{} filter {}: analytic {analytic:e}, numeric {numeric:e}, rel err {err:e}",
                layer.name,
                filters[b]
            );
            assert!(
                analytic.abs() > 1e-6,
                "degenerate check: zero gradient for {} filter {}",
                layer.name,
                filters[b]
            );
        }
    });
}

fn no_regularizers() -> Settings {
    Settings {
        lp_norm_weight: 0.0,
        tv_weight: 0.0,
        ..Preset::Quick.settings()
    }
}

#[test]
fn network_gradient_matches_finite_differences_pre_relu() {
    for layer in ["block1_conv2", "block2_conv2", "block3_conv1"] {
        check(layer, Objective::PreRelu, &no_regularizers());
    }
}

/// At 64 px every conv from block2_conv2 to block4_conv2 has maps of 8x8 or more and 128+
/// channels on both sides, so the CPU trunk computes them, forward and input gradient, with
/// Winograd F(4x4, 3x3) (unless VGG_ATLAS_CONV=direct): the gradient through six of them.
#[test]
fn network_gradient_matches_finite_differences_through_winograd() {
    assert!(
        conv::winograd_pays(256, 512)
            && conv::ConvAlgorithm::from_env() == conv::ConvAlgorithm::Auto,
        "this test checks the Winograd path; run it without VGG_ATLAS_CONV=direct"
    );
    check_h(
        "block4_conv2",
        Objective::PreRelu,
        &no_regularizers(),
        0.01,
        64,
    );
    check_h(
        "block3_conv3",
        Objective::PostRelu,
        &no_regularizers(),
        0.01,
        32,
    );
}

#[test]
fn network_gradient_matches_finite_differences_post_relu() {
    check("block2_conv1", Objective::PostRelu, &no_regularizers());
}

#[test]
fn full_objective_gradient_matches_finite_differences() {
    // No pool below block1_conv2, so a larger h is safe; it keeps the f32 rounding of the
    // perturbed pixels small against the regularizers' large per-pixel gradients.
    check_h(
        "block1_conv2",
        Objective::PreRelu,
        &Preset::Quick.settings(),
        1.0,
        SIZE,
    );
    // TV with beta != 2 exercises the general power.
    check_h(
        "block1_conv2",
        Objective::PostRelu,
        &Settings {
            tv_beta: 1.5,
            ..Preset::Quick.settings()
        },
        1.0,
        SIZE,
    );
}

#[test]
fn regularizer_gradients_match_finite_differences() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let x: Vec<f32> = (0..SIZE * SIZE * 3)
        .map(|_| rng.random::<f32>() * 255.0)
        .collect();
    for s in [
        Settings {
            tv_weight: 0.0,
            ..Preset::Quick.settings()
        },
        Settings {
            lp_norm_weight: 0.0,
            ..Preset::Quick.settings()
        },
    ] {
        let (_, g) = regularizers(&x, SIZE, &s);
        for i in [0usize, 5, 100, SIZE * SIZE * 3 - 1] {
            let h = 1e-2f32;
            let mut xp = x.clone();
            xp[i] += h;
            let mut xm = x.clone();
            xm[i] -= h;
            let numeric =
                (regularizers(&xp, SIZE, &s).0 - regularizers(&xm, SIZE, &s).0) / (2.0 * h as f64);
            assert!(
                (numeric - g[i]).abs() <= 1e-3 * g[i].abs().max(1e-6),
                "element {i}: analytic {:e}, numeric {numeric:e}",
                g[i]
            );
        }
    }
}

#[test]
fn total_variation_reaches_the_last_row_and_column() {
    // The tutorial's TV skips the last row's horizontal and the last column's vertical
    // differences, so the bottom-right pixel gets no gradient and stays a stray dot. Here every
    // edge pixel, the corner included, is pulled towards its neighbours.
    let size = 6;
    let s = Settings {
        lp_norm_weight: 0.0,
        tv_weight: 1.0,
        ..Preset::Quick.settings()
    };
    let mut x = vec![100.0f32; size * size * 3];
    let corner = ((size - 1) * size + size - 1) * 3;
    x[corner] = 200.0; // a bright dot in the corner's red channel
    let (value, grad) = regularizers(&x, size, &s);
    assert!(value > 0.0);
    assert!(
        grad[corner] > 0.0,
        "the corner is pulled down: {}",
        grad[corner]
    );
    let left = corner - 3;
    let above = corner - size * 3;
    assert!(
        grad[left] < 0.0 && grad[above] < 0.0,
        "its neighbours are pulled up"
    );
}

/// post-relu-wake is post-ReLU on an image where the filter fires and pre-ReLU where it is
/// silent: on a flat grey image some of block1_conv1's filters fire and some are silent.
#[test]
fn the_woken_objective_is_pre_relu_while_silent_and_post_relu_while_firing() {
    let layer = Layer::by_name("block1_conv1").unwrap();
    let size = 8;
    let n = size * size * 3;
    let pre = weights().preprocess.channels();
    let grey: Vec<f32> = (0..size * size)
        .flat_map(|_| pre.map(|(src, scale, off)| scale * [128.0f32, 128.0, 128.0][src] + off))
        .collect();
    let filters: Vec<usize> = (0..layer.filters()).collect();
    let input: Vec<f32> = grey
        .iter()
        .copied()
        .cycle()
        .take(n * filters.len())
        .collect();
    let mut trunk = CpuTrunk::new(weights());
    pool().install(|| {
        let mut run = |obj: Objective| {
            let mut g = vec![0.0f32; input.len()];
            let scores = trunk
                .run(layer, &filters, size, size, &input, obj, Some(&mut g))
                .unwrap();
            (scores, g)
        };
        let (scores, g_pre) = run(Objective::PreRelu);
        let (_, g_post) = run(Objective::PostRelu);
        let (woken, g_wake) = run(Objective::PostReluWake);
        let silent: Vec<usize> = (0..filters.len())
            .filter(|&f| scores[f].post == 0.0)
            .collect();
        let firing: Vec<usize> = (0..filters.len())
            .filter(|&f| scores[f].post > 0.0)
            .collect();
        assert!(
            !silent.is_empty() && !firing.is_empty(),
            "the test needs both kinds: {} silent, {} firing",
            silent.len(),
            firing.len()
        );
        let image = |g: &[f32], f: usize| g[f * n..(f + 1) * n].to_vec();
        for &f in &silent {
            assert_eq!(woken[f].target(Objective::PostReluWake), scores[f].pre);
            assert_eq!(image(&g_wake, f), image(&g_pre, f), "silent filter {f}");
            assert!(image(&g_pre, f).iter().any(|v| *v != 0.0));
        }
        for &f in &firing {
            assert_eq!(woken[f].target(Objective::PostReluWake), scores[f].post);
            assert_eq!(image(&g_wake, f), image(&g_post, f), "firing filter {f}");
        }
    });
}
