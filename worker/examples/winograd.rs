//! The 3x3 convs of VGG16 at one image size and batch, forward and input gradient, timed three
//! ways on the same buffers: the direct path (`conv3x3`), Winograd F(2x2, 3x3) and F(4x4, 3x3).
//! `cargo run --release -p vgg-atlas-worker --example winograd [SIZE] [BATCH] [THREADS]`
//! (default 128 16 all cores). Prints ms per call (median of 5) and the speedups.

use std::time::Instant;

use vgg_atlas_worker::engine::conv::{conv3x3, Geom};
use vgg_atlas_worker::engine::winograd::{conv3x3_winograd, Tile, WinogradKernel};

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let size = args.first().copied().unwrap_or(128);
    let batch = args.get(1).copied().unwrap_or(16);
    let threads = args.get(2).copied().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let layers = [
        ("block1_conv1", 1, 3, 64),
        ("block1_conv2", 1, 64, 64),
        ("block2_conv1", 2, 64, 128),
        ("block2_conv2", 2, 128, 128),
        ("block3_conv1", 4, 128, 256),
        ("block3_conv2", 4, 256, 256),
        ("block4_conv1", 8, 256, 512),
        ("block4_conv2", 8, 512, 512),
        ("block5_conv1", 16, 512, 512),
    ];
    println!("{size} px, batch {batch}, {threads} threads; ms per call, median of 5");
    println!(
        "{:<14} {:<8} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "layer", "pass", "direct", "F2", "F4", "F2 x", "F4 x"
    );
    for (name, down, cin, cout) in layers {
        let side = size / down;
        for (pass, ci, co) in [("forward", cin, cout), ("input-grad", cout, cin)] {
            if pass == "input-grad" && name == "block1_conv1" {
                continue; // the image's gradient is taken by the first conv's backward: Cout 3
            }
            let g = Geom {
                batch,
                h: side,
                w: side,
                c: ci,
            };
            let x: Vec<f32> = (0..g.rows() * ci)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            let packed: Vec<f32> = (0..9 * ci * co)
                .map(|i| ((i * 104729) % 1000) as f32 / 1e5)
                .collect();
            let mut out = vec![0.0f32; g.rows() * co];
            let (f2, f4) = (
                WinogradKernel::new(Tile::F2, &packed, ci, co),
                WinogradKernel::new(Tile::F4, &packed, ci, co),
            );
            pool.install(|| {
                let d = median_ms(|| conv3x3(g, &x, ci, &packed, co, &mut out));
                let w2 = median_ms(|| conv3x3_winograd(g, &x, &f2, &mut out));
                let w4 = median_ms(|| conv3x3_winograd(g, &x, &f4, &mut out));
                println!(
                    "{name:<14} {pass:<8} {d:>9.2} {w2:>9.2} {w4:>9.2} {:>6.2}x {:>6.2}x",
                    d / w2,
                    d / w4
                );
            });
        }
    }
}
