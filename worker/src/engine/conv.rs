//! The CPU hot path: 3x3/stride-1/pad-1 convolution on the `gemm` crate.
//!
//! Activations live in *padded NHWC*: `[B, H+2, W+2, C]` with a zero border. In that layout,
//! output pixel row `r` needs input rows `r + (ky-1)*(W+2) + (kx-1)`, so each kernel tap is one
//! GEMM over the whole batch (`[rows, Cin] x [Cin, Cout]`), accumulated into the output, with no
//! im2col copy. Rows that land on the border are garbage and are zeroed by the epilogue. Layers
//! with few input channels (block1_conv1, Cin = 3) or few pixels (where the border is a large
//! share of the rows) use one im2col GEMM over the interior pixels instead.

use gemm::Parallelism;
use rayon::prelude::*;

/// Geometry of a padded NHWC buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geom {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Geom {
    pub fn row_len(&self) -> usize {
        self.w + 2
    }
    pub fn rows_per_image(&self) -> usize {
        (self.h + 2) * (self.w + 2)
    }
    pub fn rows(&self) -> usize {
        self.batch * self.rows_per_image()
    }
    /// Floats in the buffer.
    pub fn floats(&self) -> usize {
        self.rows() * self.c
    }
    /// First row any tap may write (the first interior pixel of image 0).
    pub fn margin(&self) -> usize {
        self.w + 3
    }
    /// Whether padded row `r` is an interior pixel (not border).
    pub fn interior(&self, r: usize) -> bool {
        let p = r % self.rows_per_image();
        let (y, x) = (p / self.row_len(), p % self.row_len());
        y >= 1 && y <= self.h && x >= 1 && x <= self.w
    }
    pub fn with_c(&self, c: usize) -> Geom {
        Geom { c, ..*self }
    }
    /// Row offset of tap (ky, kx).
    pub fn tap_offset(&self, tap: usize) -> isize {
        let (ky, kx) = ((tap / 3) as isize, (tap % 3) as isize);
        (ky - 1) * self.row_len() as isize + (kx - 1)
    }
}

/// A conv layer's kernel packed for the forward pass and for the input-gradient pass.
pub struct PackedConv {
    pub cin: usize,
    pub cout: usize,
    /// `[tap][cin][cout]`: forward.
    pub forward: Vec<f32>,
    /// `[tap][cout][cin]`, kernel flipped: the input gradient is this conv of the output gradient.
    pub backward: Vec<f32>,
    pub bias: Vec<f32>,
    /// OIHW, for single-channel work on the target layer.
    pub oihw: Vec<f32>,
}

impl PackedConv {
    pub fn new(cin: usize, cout: usize, oihw: &[f32], bias: &[f32]) -> PackedConv {
        let mut forward = vec![0.0; 9 * cin * cout];
        let mut backward = vec![0.0; 9 * cin * cout];
        for o in 0..cout {
            for i in 0..cin {
                for tap in 0..9 {
                    let v = oihw[(o * cin + i) * 9 + tap];
                    forward[(tap * cin + i) * cout + o] = v;
                    backward[((8 - tap) * cout + o) * cin + i] = v;
                }
            }
        }
        PackedConv {
            cin,
            cout,
            forward,
            backward,
            bias: bias.to_vec(),
            oihw: oihw.to_vec(),
        }
    }
}

/// `out = conv3x3(x)` over padded buffers of geometry `g` (channels `cin` in, `cout` out),
/// without bias; `packed` is `[tap][cin][cout]`. Border rows of `out` are left garbage.
///
/// The output rows are cut into blocks small enough that a block of `out` stays in cache while
/// all nine taps accumulate into it; blocks run in parallel on the current rayon pool.
pub fn conv3x3(g: Geom, x: &[f32], cin: usize, packed: &[f32], cout: usize, out: &mut [f32]) {
    let m0 = g.margin();
    let m = g.rows() - 2 * m0;
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
    assert_eq!(
        packed.len(),
        9 * cin * cout,
        "packed kernel does not match the channels"
    );
    if compact(g, cin) {
        return conv_compact(g, x, cin, packed, cout, out);
    }
    let block = (BLOCK_FLOATS / cout).max(256);
    let body = &mut out[m0 * cout..(m0 + m) * cout];
    body.par_chunks_mut(block * cout)
        .enumerate()
        .for_each(|(bi, dst)| {
            let r0 = m0 + bi * block;
            let rows = dst.len() / cout;
            for tap in 0..9 {
                let start = ((r0 as isize) + g.tap_offset(tap)) as usize;
                // SAFETY: rows start..start+rows of x lie within 0..g.rows() because every
                // |tap offset| <= m0 and r0..r0+rows lies within m0..rows-m0; dst is rows x cout.
                unsafe {
                    gemm::gemm(
                        rows,
                        cout,
                        cin,
                        dst.as_mut_ptr(),
                        1,
                        cout as isize,
                        tap > 0,
                        x.as_ptr().add(start * cin),
                        1,
                        cin as isize,
                        packed.as_ptr().add(tap * cin * cout),
                        1,
                        cout as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
}

/// Floats of output per block (256 KiB), at least 256 rows: large enough to amortise the
/// GEMM's packing of the kernel, small enough to stay in L2 across the nine taps. (Measured:
/// 16-32% faster than nine whole-batch GEMMs on block1-3 at 128 px.)
const BLOCK_FLOATS: usize = 64 * 1024;

/// Layers with few input channels or few pixels take the compact path.
fn compact(g: Geom, cin: usize) -> bool {
    cin < 16 || g.h * g.w <= 16 * 16
}

/// A raw pointer that rayon tasks may share; each task writes disjoint rows.
#[derive(Clone, Copy)]
struct RowsPtr(*mut f32);
// SAFETY: only used to write rows that no other task writes (see conv_compact).
unsafe impl Send for RowsPtr {}
unsafe impl Sync for RowsPtr {}
impl RowsPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// im2col over the interior pixels only, one GEMM with K = 9*Cin per block, scattered back
/// into the padded layout. For block1_conv1 (Cin = 3) one GEMM with K = 27 beats nine with
/// K = 3; for small maps (block4/5 at 128 px: 16x16 and 8x8) it skips the border rows the tap
/// path would compute and discard (21% and 36% of the work).
fn conv_compact(g: Geom, x: &[f32], cin: usize, packed: &[f32], cout: usize, out: &mut [f32]) {
    let pixels = g.h * g.w;
    let total = g.batch * pixels;
    let block = (BLOCK_FLOATS / cout).max(256);
    let k = 9 * cin;
    let padded_row = move |q: usize| {
        let (n, rem) = (q / pixels, q % pixels);
        n * g.rows_per_image() + (rem / g.w + 1) * g.row_len() + rem % g.w + 1
    };
    let dst_rows = RowsPtr(out.as_mut_ptr());
    (0..total.div_ceil(block)).into_par_iter().for_each(|bi| {
        let q0 = bi * block;
        let rows = block.min(total - q0);
        SCRATCH.with(|cell| {
            let (col, dst) = &mut *cell.borrow_mut();
            col.resize(rows * k, 0.0);
            dst.resize(rows * cout, 0.0);
            for r in 0..rows {
                let p = padded_row(q0 + r);
                for tap in 0..9 {
                    let src = (p as isize + g.tap_offset(tap)) as usize * cin;
                    col[r * k + tap * cin..r * k + (tap + 1) * cin]
                        .copy_from_slice(&x[src..src + cin]);
                }
            }
            // SAFETY: col is rows x k, packed is k x cout, dst is rows x cout, all row-major.
            unsafe {
                gemm::gemm(
                    rows,
                    cout,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    cout as isize,
                    false,
                    col.as_ptr(),
                    1,
                    k as isize,
                    packed.as_ptr(),
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
            for r in 0..rows {
                let p = padded_row(q0 + r);
                // SAFETY: padded_row is injective, so no two tasks write the same row, and
                // p < g.rows() keeps the write inside `out` (checked by the caller's asserts).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        dst.as_ptr().add(r * cout),
                        dst_rows.get().add(p * cout),
                        cout,
                    )
                };
            }
        });
    });
}
