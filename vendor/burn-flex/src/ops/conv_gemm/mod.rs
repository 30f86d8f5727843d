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
//! Everything here is f32; the callers cast other float types (`f32s::in_f32`). `layout` says
//! where the input is read at each offset; this file runs the products.

mod layout;

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_backend::ops::{ConvOptions, ConvTransposeOptions};
use burn_std::Shape;

use super::f32s::{contiguous, tensor};
use crate::FlexTensor;
use layout::{Geometry, Plan, gather, scatter_add};

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

/// The convolution of `input` (`[batch, channels_in, ..]`) by `weight`, as `output_shape`.
fn forward(
    geometry: &Geometry,
    input: &FlexTensor,
    weight: &FlexTensor,
    bias: Option<&FlexTensor>,
    output_shape: Shape,
) -> FlexTensor {
    let g = *geometry;
    let input = contiguous(input);
    let weight = contiguous(weight);
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
        let bias = contiguous(bias);
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
    let weight = contiguous(weight);
    let output_grad = contiguous(output_grad);
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
fn weight_gradient(
    geometry: &Geometry,
    input: &FlexTensor,
    output_grad: &FlexTensor,
    weight_shape: Shape,
) -> FlexTensor {
    let g = *geometry;
    let input = contiguous(input);
    let output_grad = contiguous(output_grad);
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
