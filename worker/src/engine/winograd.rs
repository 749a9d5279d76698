//! Winograd convolution F(m x m, 3 x 3) for the CPU trunk's 3x3 convs: the same contract as
//! [`super::conv::conv3x3`] (padded NHWC in, padded NHWC out, interior rows written, no bias),
//! with fewer multiplications. An output tile of m x m pixels is computed from an input patch
//! of (m+2) x (m+2) pixels as `Y = Aᵀ [U ⊙ V] A`, where `V = Bᵀ d B` is the patch transformed
//! and `U = G g Gᵀ` the kernel transformed (once, when the kernel is packed). The element-wise
//! product over channels is (m+2)² matrix products, `[tiles, Cin] x [Cin, Cout]`, on the `gemm`
//! crate: 36 instead of 144 multiply-adds per output pixel and channel pair for F(4x4, 3x3)
//! (4x fewer), 16 instead of 36 for F(2x2, 3x3) (2.25x fewer).
//!
//! The transforms are Lavin and Gray's ("Fast Algorithms for Convolutional Neural Networks",
//! 2015), with interpolation points 0, ±1, ±2 and ∞ for F(4x4, 3x3). Their rounding error
//! grows with m; `tests` bounds it against the direct conv.
//!
//! The input gradient is a 3x3 conv too (the kernel turned and its channels swapped), so the
//! same code serves the backward pass with that kernel.

use gemm::Parallelism;
use rayon::prelude::*;

use super::conv::{Geom, RowsPtr as Shared};

/// The transform matrices of one F(m x m, 3 x 3), row-major.
struct Transform {
    m: usize,
    alpha: usize,
    /// Bᵀ, alpha x alpha.
    bt: &'static [f64],
    /// G, alpha x 3.
    g: &'static [f64],
    /// Aᵀ, m x alpha.
    at: &'static [f64],
}

const F2: Transform = Transform {
    m: 2,
    alpha: 4,
    bt: &[
        1.0, 0.0, -1.0, 0.0, //
        0.0, 1.0, 1.0, 0.0, //
        0.0, -1.0, 1.0, 0.0, //
        0.0, 1.0, 0.0, -1.0,
    ],
    g: &[
        1.0, 0.0, 0.0, //
        0.5, 0.5, 0.5, //
        0.5, -0.5, 0.5, //
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 0.0, //
        0.0, 1.0, -1.0, -1.0,
    ],
};

const F4: Transform = Transform {
    m: 4,
    alpha: 6,
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0, //
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0, //
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0, //
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0, //
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0, //
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    g: &[
        0.25,
        0.0,
        0.0,
        -1.0 / 6.0,
        -1.0 / 6.0,
        -1.0 / 6.0,
        -1.0 / 6.0,
        1.0 / 6.0,
        -1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 12.0,
        1.0 / 6.0,
        1.0 / 24.0,
        -1.0 / 12.0,
        1.0 / 6.0,
        0.0,
        0.0,
        1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0, //
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0, //
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0, //
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

/// Output tile side: 2 for F(2x2, 3x3), 4 for F(4x4, 3x3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    fn transform(self) -> &'static Transform {
        match self {
            Tile::F2 => &F2,
            Tile::F4 => &F4,
        }
    }
}

/// A kernel transformed for Winograd: `U = G g Gᵀ` per (Cin, Cout), as `[alpha²][Cin][Cout]`.
pub struct WinogradKernel {
    pub tile: Tile,
    pub cin: usize,
    pub cout: usize,
    u: Vec<f32>,
}

impl WinogradKernel {
    /// From a kernel packed as `[tap][cin][cout]` (tap = ky * 3 + kx), as `conv3x3` takes it.
    pub fn new(tile: Tile, packed: &[f32], cin: usize, cout: usize) -> WinogradKernel {
        assert_eq!(packed.len(), 9 * cin * cout, "packed kernel size");
        let t = tile.transform();
        let a = t.alpha;
        let mut u = vec![0.0f32; a * a * cin * cout];
        for i in 0..cin {
            for o in 0..cout {
                let w = |ky: usize, kx: usize| packed[((ky * 3 + kx) * cin + i) * cout + o] as f64;
                // G g (alpha x 3), then (G g) Gᵀ (alpha x alpha), in f64.
                let mut gg = [[0.0f64; 3]; 6];
                for (r, row) in gg.iter_mut().enumerate().take(a) {
                    for (kx, v) in row.iter_mut().enumerate() {
                        *v = (0..3).map(|ky| t.g[r * 3 + ky] * w(ky, kx)).sum();
                    }
                }
                for r in 0..a {
                    for c in 0..a {
                        let v: f64 = (0..3).map(|kx| gg[r][kx] * t.g[c * 3 + kx]).sum();
                        u[((r * a + c) * cin + i) * cout + o] = v as f32;
                    }
                }
            }
        }
        WinogradKernel { tile, cin, cout, u }
    }
}

thread_local! {
    /// The transformed inputs and products, kept across calls (a step runs the same shapes
    /// again): large buffers allocated once, not page-faulted in every step.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `out = conv3x3(x)` over padded buffers of geometry `g` (channels `k.cin` in, `k.cout` out),
/// without bias. Interior rows of `out` are written; border rows are left as they were.
pub fn conv3x3_winograd(g: Geom, x: &[f32], k: &WinogradKernel, out: &mut [f32]) {
    let (cin, cout) = (k.cin, k.cout);
    assert_eq!(
        x.len(),
        g.rows() * cin,
        "input buffer does not match its geometry"
    );
    assert_eq!(
        out.len(),
        g.rows() * cout,
        "output buffer does not match its geometry"
    );
    let t = k.tile.transform();
    let (m, a) = (t.m, t.alpha);
    let a2 = a * a;
    let (ty, tx) = (g.h.div_ceil(m), g.w.div_ceil(m));
    let all_tiles = g.batch * ty * tx;
    // The tiles go through in chunks whose scratch stays under SCRATCH_BYTES (a 224 px batch of
    // 16 at block2_conv2 would need 460 MB at once); a chunk is still thousands of GEMM rows.
    let per_chunk = (SCRATCH_BYTES / (4 * a2 * (cin + cout))).max(256);
    let (mut v, mut prod) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    for first in (0..all_tiles).step_by(per_chunk) {
        let tiles = per_chunk.min(all_tiles - first);
        // Tile `first + n` of image `b` has its output origin at padded (1 + m*ty_i, 1 + m*tx_i)
        // and reads the input patch from padded (m*ty_i, m*tx_i), alpha x alpha.
        let origin = move |n: usize| {
            let tile = first + n;
            let (b, rem) = (tile / (ty * tx), tile % (ty * tx));
            (b, (rem / tx) * m, (rem % tx) * m)
        };
        v.resize(tiles * a2 * cin, 0.0);
        prod.resize(tiles * a2 * cout, 0.0);
        chunk(g, x, k, out, tiles, origin, &mut v, &mut prod);
    }
    SCRATCH.with(|s| *s.borrow_mut() = (v, prod));
}

/// The most scratch (transformed inputs and products) one Winograd call holds, in bytes.
const SCRATCH_BYTES: usize = 64 << 20;

/// One chunk of `tiles` tiles (`origin` maps a chunk-local tile to its image and padded
/// origin): transform, multiply, transform back into `out`.
#[allow(clippy::too_many_arguments)]
fn chunk(
    g: Geom,
    x: &[f32],
    k: &WinogradKernel,
    out: &mut [f32],
    tiles: usize,
    origin: impl Fn(usize) -> (usize, usize, usize) + Sync,
    v: &mut [f32],
    prod: &mut [f32],
) {
    let (cin, cout) = (k.cin, k.cout);
    let t = k.tile.transform();
    let (m, a) = (t.m, t.alpha);
    let a2 = a * a;

    // 1. V = Bᵀ d B per tile, as [tile][alpha²][cin].
    v.par_chunks_mut(a2 * cin)
        .enumerate()
        .for_each(|(tile, vt)| {
            let (b, y0, x0) = origin(tile);
            let mut d = vec![0.0f32; a2 * cin];
            for py in 0..a {
                for px in 0..a {
                    let (y, xx) = (y0 + py, x0 + px);
                    if y < g.h + 2 && xx < g.w + 2 {
                        let row = b * g.rows_per_image() + y * g.row_len() + xx;
                        d[(py * a + px) * cin..(py * a + px + 1) * cin]
                            .copy_from_slice(&x[row * cin..(row + 1) * cin]);
                    }
                }
            }
            // Rows first: t1[i][c'] = sum_j Bᵀ[c'][j] d[i][j]; then V[r][c'] = sum_i Bᵀ[r][i] t1[i][c'].
            let mut t1 = vec![0.0f32; a2 * cin];
            for i in 0..a {
                for c in 0..a {
                    let dst = &mut t1[(i * a + c) * cin..(i * a + c + 1) * cin];
                    for j in 0..a {
                        let coef = t.bt[c * a + j] as f32;
                        if coef != 0.0 {
                            let src = &d[(i * a + j) * cin..(i * a + j + 1) * cin];
                            for (o, s) in dst.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                }
            }
            vt.fill(0.0);
            for r in 0..a {
                for c in 0..a {
                    let dst = &mut vt[(r * a + c) * cin..(r * a + c + 1) * cin];
                    for i in 0..a {
                        let coef = t.bt[r * a + i] as f32;
                        if coef != 0.0 {
                            let src = &t1[(i * a + c) * cin..(i * a + c + 1) * cin];
                            for (o, s) in dst.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                }
            }
        });

    // 2. For each of the alpha² points: [tiles, cin] x [cin, cout], one GEMM over every tile.
    let (vp, pp) = (Shared(v.as_mut_ptr()), Shared(prod.as_mut_ptr()));
    (0..a2).into_par_iter().for_each(|xi| {
        // SAFETY: the LHS is the xi-th cin-block of every tile's row of v (row stride a2*cin),
        // the destination the xi-th cout-block of every row of prod (row stride a2*cout): each
        // task writes only its own xi block; u's xi-th block is cin x cout.
        unsafe {
            gemm::gemm(
                tiles,
                cout,
                cin,
                pp.get().add(xi * cout),
                1,
                (a2 * cout) as isize,
                false,
                vp.get().add(xi * cin),
                1,
                (a2 * cin) as isize,
                k.u.as_ptr().add(xi * cin * cout),
                1,
                cout as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });

    // 3. Y = Aᵀ M A per tile, written to the interior rows it covers.
    let op = Shared(out.as_mut_ptr());
    prod.par_chunks(a2 * cout)
        .enumerate()
        .for_each(|(tile, mt)| {
            let (b, y0, x0) = origin(tile);
            // t2[r][j] = sum_c M[r][c] Aᵀ[j][c] (alpha x m); Y[i][j] = sum_r Aᵀ[i][r] t2[r][j].
            let mut t2 = vec![0.0f32; a * m * cout];
            for r in 0..a {
                for j in 0..m {
                    let dst = &mut t2[(r * m + j) * cout..(r * m + j + 1) * cout];
                    for c in 0..a {
                        let coef = t.at[j * a + c] as f32;
                        if coef != 0.0 {
                            let src = &mt[(r * a + c) * cout..(r * a + c + 1) * cout];
                            for (o, s) in dst.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                }
            }
            let mut y = vec![0.0f32; cout];
            for i in 0..m {
                for j in 0..m {
                    let (py, px) = (y0 + 1 + i, x0 + 1 + j);
                    if py > g.h || px > g.w {
                        continue;
                    }
                    y.fill(0.0);
                    for r in 0..a {
                        let coef = t.at[i * a + r] as f32;
                        if coef != 0.0 {
                            let src = &t2[(r * m + j) * cout..(r * m + j + 1) * cout];
                            for (o, s) in y.iter_mut().zip(src) {
                                *o += coef * s;
                            }
                        }
                    }
                    let row = b * g.rows_per_image() + py * g.row_len() + px;
                    // SAFETY: each interior pixel belongs to exactly one tile, so no two tasks
                    // write the same row; row < g.rows() (checked by the asserts above).
                    unsafe {
                        std::ptr::copy_nonoverlapping(y.as_ptr(), op.get().add(row * cout), cout)
                    };
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::conv::conv3x3;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// The largest difference over the interior, relative to the largest output.
    fn compare(tile: Tile, g: Geom, cin: usize, cout: usize) -> f32 {
        let mut x = pseudo(g.rows() * cin, 1);
        for r in 0..g.rows() {
            if !g.interior(r) {
                x[r * cin..(r + 1) * cin].fill(0.0);
            }
        }
        let packed = pseudo(9 * cin * cout, 2);
        let mut direct = vec![0.0; g.rows() * cout];
        conv3x3(g, &x, cin, &packed, cout, &mut direct);
        let k = WinogradKernel::new(tile, &packed, cin, cout);
        let mut wino = vec![f32::NAN; g.rows() * cout];
        conv3x3_winograd(g, &x, &k, &mut wino);
        let (mut worst, mut scale) = (0.0f32, 0.0f32);
        for r in (0..g.rows()).filter(|&r| g.interior(r)) {
            for c in 0..cout {
                let (d, w) = (direct[r * cout + c], wino[r * cout + c]);
                worst = worst.max((d - w).abs());
                scale = scale.max(d.abs());
            }
        }
        worst / scale
    }

    #[test]
    fn winograd_matches_the_direct_conv_on_every_shape() {
        // Maps that are and are not multiples of the tile, batches, both paths of conv3x3
        // (few and many input channels).
        for tile in [Tile::F2, Tile::F4] {
            for (batch, h, w, cin, cout) in [
                (2, 8, 8, 16, 24),
                (1, 5, 7, 32, 8),
                (3, 6, 10, 3, 16),
                (2, 16, 16, 64, 64),
                (1, 1, 1, 8, 8),
            ] {
                let g = Geom {
                    batch,
                    h,
                    w,
                    c: cin,
                };
                let err = compare(tile, g, cin, cout);
                let bound = match tile {
                    Tile::F2 => 1e-5,
                    Tile::F4 => 1e-4,
                };
                assert!(
                    err < bound,
                    "{tile:?} {batch}x{h}x{w} {cin}->{cout}: relative error {err:e}"
                );
            }
        }
    }

    #[test]
    fn a_call_with_more_tiles_than_a_chunk_matches_the_direct_conv() {
        // 512 channels each way: a chunk holds 455 tiles. Maps of 38 x 38 are 10 x 10 tiles
        // (the last row and column partial): 2 images are one chunk; 5 images are 500 tiles,
        // and the chunk boundary at tile 455 falls inside image 4 and inside a row of tiles.
        let per_chunk = SCRATCH_BYTES / (4 * 36 * 1024);
        assert_eq!(per_chunk, 455);
        for batch in [2, 5] {
            let g = Geom {
                batch,
                h: 38,
                w: 38,
                c: 512,
            };
            let tiles = batch * 10 * 10;
            let err = compare(Tile::F4, g, 512, 512);
            assert!(err < 1e-4, "{tiles} tiles: relative error {err:e}");
        }
    }

    #[test]
    fn a_wrong_transform_would_be_caught() {
        // The comparison itself can fail: a kernel transformed for the wrong tile is far off.
        let g = Geom {
            batch: 1,
            h: 8,
            w: 8,
            c: 8,
        };
        let packed = pseudo(9 * 8 * 8, 3);
        let mut k = WinogradKernel::new(Tile::F4, &packed, 8, 8);
        k.u[0] += 1.0;
        let x = {
            let mut x = pseudo(g.rows() * 8, 4);
            for r in 0..g.rows() {
                if !g.interior(r) {
                    x[r * 8..(r + 1) * 8].fill(0.0);
                }
            }
            x
        };
        let mut direct = vec![0.0; g.rows() * 8];
        conv3x3(g, &x, 8, &packed, 8, &mut direct);
        let mut wino = vec![0.0; g.rows() * 8];
        conv3x3_winograd(g, &x, &k, &mut wino);
        let off = (0..g.rows())
            .filter(|&r| g.interior(r))
            .any(|r| (direct[r * 8] - wino[r * 8]).abs() > 1e-3);
        assert!(off);
    }
}
