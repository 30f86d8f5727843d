//! Alveolus: where a convolution reads its input at each kernel offset (`conv_gemm`'s module
//! documentation says how): its geometry, the padded input and output grid of stride 1, and the
//! gathered copies of larger strides.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::ops::{ConvOptions, ConvTransposeOptions};
use burn_std::Shape;

/// A convolution of rank 1 to 3, seen as 3D (missing leading dimensions have size 1).
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    pub(super) batch: usize,
    pub(super) groups: usize,
    pub(super) channels_in: usize,
    pub(super) channels_out: usize,
    pub(super) input: [usize; 3],
    pub(super) output: [usize; 3],
    pub(super) kernel: [usize; 3],
    pub(super) stride: [usize; 3],
    pub(super) dilation: [usize; 3],
    /// Zeros before the input in each dimension; those after follow from the output's size.
    pub(super) padding: [usize; 3],
}

/// Lifts `N` spatial sizes to 3, padding at the front with `fill`.
fn lift<const N: usize>(values: [usize; N], fill: usize) -> [usize; 3] {
    let mut out = [fill; 3];
    out[3 - N..].copy_from_slice(&values);
    out
}

fn spatial<const N: usize>(shape: &Shape) -> [usize; N] {
    core::array::from_fn(|i| shape[2 + i])
}

impl Geometry {
    /// `input` is `[batch, channels_in, ..]`, `weight` `[channels_out, channels_in / groups, ..]`
    /// and `output` `[batch, channels_out, ..]`.
    pub(super) fn of_conv<const N: usize>(
        input: &Shape,
        weight: &Shape,
        output: &Shape,
        options: &ConvOptions<N>,
    ) -> Self {
        Self {
            batch: input[0],
            groups: options.groups,
            channels_in: input[1],
            channels_out: weight[0],
            input: lift(spatial::<N>(input), 1),
            output: lift(spatial::<N>(output), 1),
            kernel: lift(spatial::<N>(weight), 1),
            stride: lift(options.stride, 1),
            dilation: lift(options.dilation, 1),
            padding: lift(options.padding_begin(), 0),
        }
    }

    /// The convolution whose input gradient a transposed convolution is: its input is the
    /// transposed convolution's output, and the other way round.
    pub(super) fn of_transposed<const N: usize>(
        input: &Shape,
        weight: &Shape,
        output: &Shape,
        options: &ConvTransposeOptions<N>,
    ) -> Self {
        Self {
            batch: input[0],
            groups: options.groups,
            channels_in: output[1],
            channels_out: input[1],
            input: lift(spatial::<N>(output), 1),
            output: lift(spatial::<N>(input), 1),
            kernel: lift(spatial::<N>(weight), 1),
            stride: lift(options.stride, 1),
            dilation: lift(options.dilation, 1),
            padding: lift(options.padding, 0),
        }
    }

    /// A forward convolution's output size: `(in + before + after - reach - 1) / stride + 1`.
    pub(super) fn conv_output<const N: usize>(
        input: &Shape,
        weight: &Shape,
        options: &ConvOptions<N>,
    ) -> Shape {
        let mut dims = vec![input[0], weight[0]];
        for i in 0..N {
            let reach = options.dilation[i] * (weight[2 + i] - 1);
            let (before, after) = options.padding[i];
            // Empty when the kernel reaches past the padded input.
            let room = (input[2 + i] + before + after).checked_sub(reach + 1);
            dims.push(room.map_or(0, |room| room / options.stride[i] + 1));
        }
        Shape::from(dims)
    }

    pub(super) fn in_group(&self) -> usize {
        self.channels_in / self.groups
    }

    pub(super) fn out_group(&self) -> usize {
        self.channels_out / self.groups
    }

    pub(super) fn kernel_volume(&self) -> usize {
        self.kernel.iter().product()
    }

    pub(super) fn input_volume(&self) -> usize {
        self.input.iter().product()
    }

    pub(super) fn output_volume(&self) -> usize {
        self.output.iter().product()
    }

    /// Nothing to multiply: some size is zero, and every result is zeros.
    pub(super) fn is_empty(&self) -> bool {
        self.batch * self.channels_in * self.channels_out * self.kernel_volume() == 0
            || self.input_volume() == 0
            || self.output_volume() == 0
    }

    pub(super) fn weight_len(&self) -> usize {
        self.channels_out * self.in_group() * self.kernel_volume()
    }

    /// The kernel offset `k` as `(depth, row, column)`.
    pub(super) fn offset(&self, k: usize) -> [usize; 3] {
        let [_, kh, kw] = self.kernel;
        [k / (kh * kw), (k / kw) % kh, k % kw]
    }

    pub(super) fn plan(&self) -> Plan {
        if self.stride != [1, 1, 1] {
            return Plan::Gather;
        }
        let padded: [usize; 3] =
            core::array::from_fn(|i| self.output[i] + self.dilation[i] * (self.kernel[i] - 1));
        Plan::Shift(Shift {
            padded,
            plane: padded[1] * padded[2],
            row: padded[2],
            padded_volume: padded.iter().product(),
            grid_volume: self.output[0] * padded[1] * padded[2],
            span: (self.output[0] - 1) * padded[1] * padded[2]
                + (self.output[1] - 1) * padded[2]
                + self.output[2],
            input_is_padded: self.padding == [0, 0, 0] && padded == self.input,
            grid_is_output: padded[1] == self.output[1] && padded[2] == self.output[2],
        })
    }
}

/// How the input at a kernel offset is read.
pub(super) enum Plan {
    /// Stride 1: a view of the padded input.
    Shift(Shift),
    /// Any stride: a gathered copy per offset.
    Gather,
}

/// The padded input and the output grid laid on it.
pub(super) struct Shift {
    pub(super) padded: [usize; 3],
    pub(super) plane: usize,
    pub(super) row: usize,
    pub(super) padded_volume: usize,
    /// One channel of the output grid: output planes of padded rows.
    pub(super) grid_volume: usize,
    /// From the grid's first output cell to its last: the length every product runs over.
    pub(super) span: usize,
    /// The input is its own padded copy (no padding, and no input beyond the output's reach).
    pub(super) input_is_padded: bool,
    /// The grid is the output's own layout (the kernel spans one cell across rows and columns).
    pub(super) grid_is_output: bool,
}

impl Shift {
    pub(super) fn offset(&self, geometry: &Geometry, k: usize) -> usize {
        let [a, b, c] = geometry.offset(k);
        let [da, db, dc] = geometry.dilation;
        a * da * self.plane + b * db * self.row + c * dc
    }

    /// Copies `channels` planes of the input into the padded buffer, whose padding stays zero.
    pub(super) fn pad(&self, geometry: &Geometry, input: &[f32], padded: &mut [f32]) {
        let [d, h, w] = geometry.input;
        let [pd, ph, pw] = geometry.padding;
        let width = w.min(self.padded[2].saturating_sub(pw));
        for (src, dst) in input
            .chunks_exact(d * h * w)
            .zip(padded.chunks_exact_mut(self.padded_volume))
        {
            for z in 0..d.min(self.padded[0].saturating_sub(pd)) {
                for y in 0..h.min(self.padded[1].saturating_sub(ph)) {
                    let from = (z * h + y) * w;
                    let to = (z + pd) * self.plane + (y + ph) * self.row + pw;
                    dst[to..to + width].copy_from_slice(&src[from..from + width]);
                }
            }
        }
    }

    /// The inverse of [`pad`](Self::pad): the input's cells of a padded buffer.
    pub(super) fn crop(&self, geometry: &Geometry, padded: &[f32], input: &mut [f32]) {
        let [d, h, w] = geometry.input;
        let [pd, ph, pw] = geometry.padding;
        let width = w.min(self.padded[2].saturating_sub(pw));
        for (src, dst) in padded
            .chunks_exact(self.padded_volume)
            .zip(input.chunks_exact_mut(d * h * w))
        {
            dst.fill(0.0);
            for z in 0..d.min(self.padded[0].saturating_sub(pd)) {
                for y in 0..h.min(self.padded[1].saturating_sub(ph)) {
                    let to = (z * h + y) * w;
                    let from = (z + pd) * self.plane + (y + ph) * self.row + pw;
                    dst[to..to + width].copy_from_slice(&src[from..from + width]);
                }
            }
        }
    }

    /// Lays output-shaped planes on the grid; the cells between rows stay as they were.
    pub(super) fn to_grid(&self, geometry: &Geometry, output: &[f32], grid: &mut [f32]) {
        let [d, h, w] = geometry.output;
        for (src, dst) in output
            .chunks_exact(d * h * w)
            .zip(grid.chunks_exact_mut(self.grid_volume))
        {
            for z in 0..d {
                for y in 0..h {
                    let to = z * self.plane + y * self.row;
                    let from = (z * h + y) * w;
                    dst[to..to + w].copy_from_slice(&src[from..from + w]);
                }
            }
        }
    }

    pub(super) fn from_grid(&self, geometry: &Geometry, grid: &[f32], output: &mut [f32]) {
        let [d, h, w] = geometry.output;
        for (src, dst) in grid
            .chunks_exact(self.grid_volume)
            .zip(output.chunks_exact_mut(d * h * w))
        {
            for z in 0..d {
                for y in 0..h {
                    let from = z * self.plane + y * self.row;
                    let to = (z * h + y) * w;
                    dst[to..to + w].copy_from_slice(&src[from..from + w]);
                }
            }
        }
    }
}

/// For output positions `0..len` along one dimension, the input index at kernel position
/// `k`, or `None` in the padding.
fn source(geometry: &Geometry, dim: usize, out: usize, k: usize) -> Option<usize> {
    let at = out * geometry.stride[dim] + k * geometry.dilation[dim];
    at.checked_sub(geometry.padding[dim])
        .filter(|&i| i < geometry.input[dim])
}

/// `X_k`: the input of one batch item read at kernel offset `k`, `[channels_in, output volume]`.
pub(super) fn gather(geometry: &Geometry, k: usize, input: &[f32], out: &mut [f32]) {
    let [kd, kh, kw] = geometry.offset(k);
    let [d, h, w] = geometry.output;
    let [_, ih, iw] = geometry.input;
    let columns: Vec<Option<usize>> = (0..w).map(|x| source(geometry, 2, x, kw)).collect();
    for (src, dst) in input
        .chunks_exact(geometry.input_volume())
        .zip(out.chunks_exact_mut(d * h * w))
    {
        for z in 0..d {
            for y in 0..h {
                let row = &mut dst[(z * h + y) * w..][..w];
                match (source(geometry, 0, z, kd), source(geometry, 1, y, kh)) {
                    (Some(sz), Some(sy)) => {
                        let line = &src[(sz * ih + sy) * iw..][..iw];
                        for (cell, column) in row.iter_mut().zip(&columns) {
                            *cell = column.map_or(0.0, |x| line[x]);
                        }
                    }
                    _ => row.fill(0.0),
                }
            }
        }
    }
}

/// Adds `dX_k` (`[channels_in, output volume]`) back where [`gather`] read `X_k`.
pub(super) fn scatter_add(geometry: &Geometry, k: usize, values: &[f32], input: &mut [f32]) {
    let [kd, kh, kw] = geometry.offset(k);
    let [d, h, w] = geometry.output;
    let [_, ih, iw] = geometry.input;
    let columns: Vec<Option<usize>> = (0..w).map(|x| source(geometry, 2, x, kw)).collect();
    for (src, dst) in values
        .chunks_exact(d * h * w)
        .zip(input.chunks_exact_mut(geometry.input_volume()))
    {
        for z in 0..d {
            for y in 0..h {
                if let (Some(sz), Some(sy)) =
                    (source(geometry, 0, z, kd), source(geometry, 1, y, kh))
                {
                    let line = &mut dst[(sz * ih + sy) * iw..][..iw];
                    for (value, column) in src[(z * h + y) * w..][..w].iter().zip(&columns) {
                        if let Some(x) = column {
                            line[*x] += value;
                        }
                    }
                }
            }
        }
    }
}
