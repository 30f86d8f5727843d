//! Alveolus: convolutions and both their gradients as one GEMM per kernel offset (the crate's
//! `PATCH.md` says why).
//!
//! For a kernel offset `k`, a convolution adds `W_k · X_k` to its output, where `W_k` is the
//! `[channels_out, channels_in]` slice of the weight at `k` and `X_k` the input read at
//! `o * stride + k * dilation - padding` for every output position `o`. The gradients are the
//! same product turned around: `dW_k = G · X_kᵀ`, and `dX_k = W_kᵀ · G` added back where `X_k`
//! was read.
//!
//! With stride 1, `X_k` is not copied: on the input padded once, it is the padded buffer read
//! from offset `k`, provided the output is laid on the padded grid (every output row as wide as
//! a padded row; the extra cells are never read back, and hold zeros where they enter a sum).
//! Larger strides gather `X_k` into a buffer, and scatter `dX_k` back, once per offset.
//!
//! Everything here is f32; the callers cast other float types.

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_backend::ops::{ConvOptions, ConvTransposeOptions};
use burn_std::{Bytes, Shape};

use crate::{FlexTensor, Layout};

/// A convolution of rank 1 to 3, seen as 3D (missing leading dimensions have size 1).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    batch: usize,
    groups: usize,
    channels_in: usize,
    channels_out: usize,
    input: [usize; 3],
    output: [usize; 3],
    kernel: [usize; 3],
    stride: [usize; 3],
    dilation: [usize; 3],
    /// Zeros before the input in each dimension; those after follow from the output's size.
    padding: [usize; 3],
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
    pub(crate) fn of_conv<const N: usize>(
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
    pub(crate) fn of_transposed<const N: usize>(
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
    pub(crate) fn conv_output<const N: usize>(
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

    fn in_group(&self) -> usize {
        self.channels_in / self.groups
    }

    fn out_group(&self) -> usize {
        self.channels_out / self.groups
    }

    fn kernel_volume(&self) -> usize {
        self.kernel.iter().product()
    }

    fn input_volume(&self) -> usize {
        self.input.iter().product()
    }

    fn output_volume(&self) -> usize {
        self.output.iter().product()
    }

    /// Nothing to multiply: some size is zero, and every result is zeros.
    fn is_empty(&self) -> bool {
        self.batch * self.channels_in * self.channels_out * self.kernel_volume() == 0
            || self.input_volume() == 0
            || self.output_volume() == 0
    }

    fn weight_len(&self) -> usize {
        self.channels_out * self.in_group() * self.kernel_volume()
    }

    /// The kernel offset `k` as `(depth, row, column)`.
    fn offset(&self, k: usize) -> [usize; 3] {
        let [_, kh, kw] = self.kernel;
        [k / (kh * kw), (k / kw) % kh, k % kw]
    }

    fn plan(&self) -> Plan {
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
enum Plan {
    /// Stride 1: a view of the padded input.
    Shift(Shift),
    /// Any stride: a gathered copy per offset.
    Gather,
}

/// The padded input and the output grid laid on it.
struct Shift {
    padded: [usize; 3],
    plane: usize,
    row: usize,
    padded_volume: usize,
    /// One channel of the output grid: output planes of padded rows.
    grid_volume: usize,
    /// From the grid's first output cell to its last: the length every product runs over.
    span: usize,
    /// The input is its own padded copy (no padding, and no input beyond the output's reach).
    input_is_padded: bool,
    /// The grid is the output's own layout (the kernel spans one cell across rows and columns).
    grid_is_output: bool,
}

impl Shift {
    fn offset(&self, geometry: &Geometry, k: usize) -> usize {
        let [a, b, c] = geometry.offset(k);
        let [da, db, dc] = geometry.dilation;
        a * da * self.plane + b * db * self.row + c * dc
    }

    /// Copies `channels` planes of the input into the padded buffer, whose padding stays zero.
    fn pad(&self, geometry: &Geometry, input: &[f32], padded: &mut [f32]) {
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
    fn crop(&self, geometry: &Geometry, padded: &[f32], input: &mut [f32]) {
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
    fn to_grid(&self, geometry: &Geometry, output: &[f32], grid: &mut [f32]) {
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

    fn from_grid(&self, geometry: &Geometry, grid: &[f32], output: &mut [f32]) {
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
fn gather(geometry: &Geometry, k: usize, input: &[f32], out: &mut [f32]) {
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
fn scatter_add(geometry: &Geometry, k: usize, values: &[f32], input: &mut [f32]) {
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

/// A matrix in memory: its first element and the distances between rows and columns.
#[derive(Clone, Copy)]
struct Matrix {
    at: *const f32,
    row: usize,
    column: usize,
}

impl Matrix {
    fn new(data: &[f32], start: usize, row: usize, column: usize) -> Self {
        Self {
            at: data[start..].as_ptr(),
            row,
            column,
        }
    }
}

/// `dst (+)= lhs · rhs` with `dst` `m x n` and `lhs` `m x k`, each matrix within its slice.
///
/// # Safety
/// Every element the strides reach from each start lies in its slice, and `dst` does not
/// overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn multiply(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    dst_start: usize,
    [dst_row, dst_column]: [usize; 2],
    accumulate: bool,
    lhs: Matrix,
    rhs: Matrix,
    parallelism: gemm::Parallelism,
) {
    let dst = dst[dst_start..].as_mut_ptr();
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_column as isize,
            dst_row as isize,
            accumulate,
            lhs.at,
            lhs.column as isize,
            lhs.row as isize,
            rhs.at,
            rhs.column as isize,
            rhs.row as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// How many parts the batch is split into, to run in parallel, and how each product runs: on
/// its own thread while the batch keeps every thread busy, else split too (rayon nests them).
fn threads_for(batch: usize) -> (usize, gemm::Parallelism) {
    #[cfg(feature = "rayon")]
    {
        let threads = rayon::current_num_threads().max(1);
        if batch >= threads {
            (threads, gemm::Parallelism::None)
        } else {
            (batch.max(1), gemm::Parallelism::Rayon(0))
        }
    }
    #[cfg(not(feature = "rayon"))]
    {
        let _ = batch;
        (1, gemm::Parallelism::None)
    }
}

/// Runs `work` on each batch item's chunk of `out` (`per_item` values each).
fn for_each_item<F>(out: &mut [f32], per_item: usize, work: F)
where
    F: Fn(usize, &mut [f32], gemm::Parallelism) + Sync + Send,
{
    let batch = out.len() / per_item.max(1);
    let (threads, parallelism) = threads_for(batch);
    #[cfg(feature = "rayon")]
    if threads > 1 {
        use rayon::prelude::*;
        out.par_chunks_mut(per_item)
            .enumerate()
            .for_each(|(item, chunk)| work(item, chunk, parallelism));
        return;
    }
    let _ = threads;
    for (item, chunk) in out.chunks_mut(per_item).enumerate() {
        work(item, chunk, parallelism);
    }
}

fn contiguous_f32(tensor: &FlexTensor) -> FlexTensor {
    debug_assert_eq!(tensor.dtype(), DType::F32);
    tensor.to_contiguous()
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// The convolution of `input` (`[batch, channels_in, ..]`) by `weight`, as `output_shape`.
pub(crate) fn forward(
    geometry: &Geometry,
    input: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    output_shape: Shape,
) -> FlexTensor {
    let g = *geometry;
    let input = contiguous_f32(input);
    let weight = contiguous_f32(weight);
    let (x, w) = (input.storage::<f32>(), weight.storage::<f32>());
    let (cin, cout, kvol) = (g.in_group(), g.out_group(), g.kernel_volume());
    let (in_volume, out_volume) = (g.input_volume(), g.output_volume());
    let mut out = vec![0f32; g.batch * g.channels_out * out_volume];
    if g.is_empty() {
        return with_bias(out, bias, output_shape);
    }
    let plan = g.plan();
    for_each_item(
        &mut out,
        g.channels_out * out_volume,
        |item, y, parallelism| {
            let x = &x[item * g.channels_in * in_volume..][..g.channels_in * in_volume];
            let weights = |group: usize, k: usize| {
                Matrix::new(w, group * cout * cin * kvol + k, cin * kvol, kvol)
            };
            match &plan {
                Plan::Shift(shift) => {
                    let padded_input;
                    let xp = if shift.input_is_padded {
                        x
                    } else {
                        let mut buffer = vec![0f32; g.channels_in * shift.padded_volume];
                        shift.pad(&g, x, &mut buffer);
                        padded_input = buffer;
                        &padded_input
                    };
                    let mut grid_buffer = Vec::new();
                    let grid: &mut [f32] = if shift.grid_is_output {
                        y
                    } else {
                        grid_buffer = vec![0f32; g.channels_out * shift.grid_volume];
                        &mut grid_buffer
                    };
                    for k in 0..kvol {
                        let at = shift.offset(&g, k);
                        for group in 0..g.groups {
                            // SAFETY: rows of `span` cells from `at` stay within each padded
                            // channel (the last read is the padded buffer's last cell).
                            unsafe {
                                multiply(
                                    [cout, shift.span, cin],
                                    grid,
                                    group * cout * shift.grid_volume,
                                    [shift.grid_volume, 1],
                                    k > 0,
                                    weights(group, k),
                                    Matrix::new(
                                        xp,
                                        group * cin * shift.padded_volume + at,
                                        shift.padded_volume,
                                        1,
                                    ),
                                    parallelism,
                                );
                            }
                        }
                    }
                    if !shift.grid_is_output {
                        shift.from_grid(&g, &grid_buffer, y);
                    }
                }
                Plan::Gather => {
                    let mut gathered = vec![0f32; g.channels_in * out_volume];
                    for k in 0..kvol {
                        gather(&g, k, x, &mut gathered);
                        for group in 0..g.groups {
                            // SAFETY: every matrix is a block of whole channels of its buffer.
                            unsafe {
                                multiply(
                                    [cout, out_volume, cin],
                                    y,
                                    group * cout * out_volume,
                                    [out_volume, 1],
                                    k > 0,
                                    weights(group, k),
                                    Matrix::new(&gathered, group * cin * out_volume, out_volume, 1),
                                    parallelism,
                                );
                            }
                        }
                    }
                }
            }
        },
    );
    with_bias(out, bias, output_shape)
}

/// `values` as a tensor of `shape`, `[batch, channels, ..]`, with `bias` added to each channel.
fn with_bias(mut values: Vec<f32>, bias: Option<&FlexTensor>, shape: Shape) -> FlexTensor {
    if let Some(bias) = bias {
        let bias = contiguous_f32(bias);
        let bias = bias.storage::<f32>();
        let run: usize = shape.iter().skip(2).product();
        for (i, channel) in values.chunks_exact_mut(run.max(1)).enumerate() {
            let b = bias[i % bias.len()];
            channel.iter_mut().for_each(|v| *v += b);
        }
    }
    tensor(values, shape)
}

/// The gradient of a convolution's input, `[batch, channels_in, ..]` flattened, from its
/// output's.
fn input_gradient(geometry: &Geometry, weight: &FlexTensor, output_grad: &FlexTensor) -> Vec<f32> {
    let g = *geometry;
    let weight = contiguous_f32(weight);
    let output_grad = contiguous_f32(output_grad);
    let (w, dy) = (weight.storage::<f32>(), output_grad.storage::<f32>());
    let (cin, cout, kvol) = (g.in_group(), g.out_group(), g.kernel_volume());
    let (in_volume, out_volume) = (g.input_volume(), g.output_volume());
    let mut out = vec![0f32; g.batch * g.channels_in * in_volume];
    if g.is_empty() {
        return out;
    }
    let plan = g.plan();
    for_each_item(
        &mut out,
        g.channels_in * in_volume,
        |item, dx, parallelism| {
            let dy = &dy[item * g.channels_out * out_volume..][..g.channels_out * out_volume];
            // `W_kᵀ`: rows are input channels.
            let weights = |group: usize, k: usize| {
                Matrix::new(w, group * cout * cin * kvol + k, kvol, cin * kvol)
            };
            match &plan {
                Plan::Shift(shift) => {
                    let grid_buffer;
                    let grid: &[f32] = if shift.grid_is_output {
                        dy
                    } else {
                        // The cells between rows must be zero: they enter the sums.
                        let mut buffer = vec![0f32; g.channels_out * shift.grid_volume];
                        shift.to_grid(&g, dy, &mut buffer);
                        grid_buffer = buffer;
                        &grid_buffer
                    };
                    let mut padded_buffer = Vec::new();
                    let padded: &mut [f32] = if shift.input_is_padded {
                        dx
                    } else {
                        padded_buffer = vec![0f32; g.channels_in * shift.padded_volume];
                        &mut padded_buffer
                    };
                    for k in 0..kvol {
                        let at = shift.offset(&g, k);
                        for group in 0..g.groups {
                            // SAFETY: as in `forward`, with the padded buffer written.
                            unsafe {
                                multiply(
                                    [cin, shift.span, cout],
                                    padded,
                                    group * cin * shift.padded_volume + at,
                                    [shift.padded_volume, 1],
                                    true,
                                    weights(group, k),
                                    Matrix::new(
                                        grid,
                                        group * cout * shift.grid_volume,
                                        shift.grid_volume,
                                        1,
                                    ),
                                    parallelism,
                                );
                            }
                        }
                    }
                    if !shift.input_is_padded {
                        shift.crop(&g, &padded_buffer, dx);
                    }
                }
                Plan::Gather => {
                    let mut products = vec![0f32; g.channels_in * out_volume];
                    for k in 0..kvol {
                        for group in 0..g.groups {
                            // SAFETY: every matrix is a block of whole channels of its buffer.
                            unsafe {
                                multiply(
                                    [cin, out_volume, cout],
                                    &mut products,
                                    group * cin * out_volume,
                                    [out_volume, 1],
                                    false,
                                    weights(group, k),
                                    Matrix::new(dy, group * cout * out_volume, out_volume, 1),
                                    parallelism,
                                );
                            }
                        }
                        scatter_add(&g, k, &products, dx);
                    }
                }
            }
        },
    );
    out
}

/// The gradient of a convolution's weight, `weight_shape`, from its input and output gradient.
pub(crate) fn weight_gradient(
    geometry: &Geometry,
    input: &FlexTensor,
    output_grad: &FlexTensor,
    weight_shape: Shape,
) -> FlexTensor {
    let g = *geometry;
    let input = contiguous_f32(input);
    let output_grad = contiguous_f32(output_grad);
    let (x, dy) = (input.storage::<f32>(), output_grad.storage::<f32>());
    let (cin, cout, kvol) = (g.in_group(), g.out_group(), g.kernel_volume());
    let (in_volume, out_volume) = (g.input_volume(), g.output_volume());
    if g.is_empty() {
        return tensor(vec![0f32; weight_shape.num_elements()], weight_shape);
    }
    let (threads, parallelism) = threads_for(g.batch);
    let plan = g.plan();

    // Each thread sums its share of the batch into its own copy; the copies are added last.
    let accumulate = |items: core::ops::Range<usize>| {
        let mut dw = vec![0f32; g.weight_len()];
        let weights_at = |group: usize, k: usize| group * cout * cin * kvol + k;
        let mut padded = Vec::new();
        let mut grid = Vec::new();
        let mut gathered = Vec::new();
        for item in items {
            let x = &x[item * g.channels_in * in_volume..][..g.channels_in * in_volume];
            let dy = &dy[item * g.channels_out * out_volume..][..g.channels_out * out_volume];
            match &plan {
                Plan::Shift(shift) => {
                    let xp: &[f32] = if shift.input_is_padded {
                        x
                    } else {
                        padded.resize(g.channels_in * shift.padded_volume, 0.0);
                        shift.pad(&g, x, &mut padded);
                        &padded
                    };
                    let dyg: &[f32] = if shift.grid_is_output {
                        dy
                    } else {
                        // Zero between rows, since those cells enter the sums.
                        grid.resize(g.channels_out * shift.grid_volume, 0.0);
                        shift.to_grid(&g, dy, &mut grid);
                        &grid
                    };
                    for k in 0..kvol {
                        let at = shift.offset(&g, k);
                        for group in 0..g.groups {
                            // SAFETY: as in `forward`; `dw`'s rows are output channels.
                            unsafe {
                                multiply(
                                    [cout, cin, shift.span],
                                    &mut dw,
                                    weights_at(group, k),
                                    [cin * kvol, kvol],
                                    true,
                                    Matrix::new(
                                        dyg,
                                        group * cout * shift.grid_volume,
                                        shift.grid_volume,
                                        1,
                                    ),
                                    Matrix::new(
                                        xp,
                                        group * cin * shift.padded_volume + at,
                                        1,
                                        shift.padded_volume,
                                    ),
                                    parallelism,
                                );
                            }
                        }
                    }
                }
                Plan::Gather => {
                    gathered.resize(g.channels_in * out_volume, 0.0);
                    for k in 0..kvol {
                        gather(&g, k, x, &mut gathered);
                        for group in 0..g.groups {
                            // SAFETY: every matrix is a block of whole channels of its buffer.
                            unsafe {
                                multiply(
                                    [cout, cin, out_volume],
                                    &mut dw,
                                    weights_at(group, k),
                                    [cin * kvol, kvol],
                                    true,
                                    Matrix::new(dy, group * cout * out_volume, out_volume, 1),
                                    Matrix::new(&gathered, group * cin * out_volume, 1, out_volume),
                                    parallelism,
                                );
                            }
                        }
                    }
                }
            }
        }
        dw
    };

    let per_thread = g.batch.div_ceil(threads.max(1)).max(1);
    let ranges: Vec<_> = (0..g.batch)
        .step_by(per_thread)
        .map(|start| start..(start + per_thread).min(g.batch))
        .collect();
    #[cfg(feature = "rayon")]
    let parts: Vec<Vec<f32>> = {
        use rayon::prelude::*;
        ranges.into_par_iter().map(accumulate).collect()
    };
    #[cfg(not(feature = "rayon"))]
    let parts: Vec<Vec<f32>> = ranges.into_iter().map(accumulate).collect();
    let mut parts = parts.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![0f32; g.weight_len()]);
    for part in parts {
        dw.iter_mut().zip(&part).for_each(|(a, b)| *a += b);
    }
    tensor(dw, weight_shape)
}

/// Runs `f` on f32 tensors: other float types are cast in, and the results cast back.
pub(crate) fn in_f32<const K: usize, const R: usize>(
    tensors: [FlexTensor; K],
    f: impl FnOnce([FlexTensor; K]) -> [FlexTensor; R],
) -> [FlexTensor; R] {
    use burn_backend::ops::FloatTensorOps;
    use burn_std::FloatDType;
    let dtype = tensors[0].dtype();
    if dtype == DType::F32 {
        return f(tensors);
    }
    let cast = tensors.map(|t| crate::Flex::float_cast(t, FloatDType::F32));
    f(cast).map(|t| crate::Flex::float_cast(t, FloatDType::from(dtype)))
}

/// Whether [`conv_forward`] is the faster forward: upstream's own paths win for 1x1 and
/// grouped (depthwise) kernels, and other float types keep upstream's kernels.
pub(crate) fn takes_forward(x: &FlexTensor, weight: &FlexTensor, groups: usize) -> bool {
    let kernel: usize = weight.layout().shape().iter().skip(2).product();
    x.dtype() == DType::F32 && weight.dtype() == DType::F32 && groups == 1 && kernel > 1
}

pub(crate) fn conv_forward<const N: usize>(
    x: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    options: &ConvOptions<N>,
) -> FlexTensor {
    let (x_shape, w_shape) = (x.layout().shape(), weight.layout().shape());
    let output = Geometry::conv_output(x_shape, w_shape, options);
    let geometry = Geometry::of_conv(x_shape, w_shape, &output, options);
    forward(&geometry, x, weight, bias, output)
}

pub(crate) fn conv_x_backward<const N: usize>(
    [x, weight, output_grad]: [FlexTensor; 3],
    options: &ConvOptions<N>,
) -> [FlexTensor; 1] {
    let shape = x.layout().shape().clone();
    let geometry = Geometry::of_conv(
        &shape,
        weight.layout().shape(),
        output_grad.layout().shape(),
        options,
    );
    [tensor(
        input_gradient(&geometry, &weight, &output_grad),
        shape,
    )]
}

pub(crate) fn conv_weight_backward<const N: usize>(
    [x, weight, output_grad]: [FlexTensor; 3],
    options: &ConvOptions<N>,
) -> [FlexTensor; 1] {
    let shape = weight.layout().shape().clone();
    let geometry = Geometry::of_conv(
        x.layout().shape(),
        &shape,
        output_grad.layout().shape(),
        options,
    );
    [weight_gradient(&geometry, &x, &output_grad, shape)]
}

/// A transposed convolution is the input gradient of the convolution
/// [`Geometry::of_transposed`] describes, so its weight gradient is that convolution's with
/// input and output swapped.
pub(crate) fn conv_transpose_weight_backward<const N: usize>(
    [x, weight, output_grad]: [FlexTensor; 3],
    options: &ConvTransposeOptions<N>,
) -> [FlexTensor; 1] {
    let shape = weight.layout().shape().clone();
    let geometry = Geometry::of_transposed(
        x.layout().shape(),
        &shape,
        output_grad.layout().shape(),
        options,
    );
    [weight_gradient(&geometry, &output_grad, &x, shape)]
}
