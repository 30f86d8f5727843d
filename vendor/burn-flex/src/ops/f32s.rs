//! Alveolus: f32 tensors in and out for `conv_gemm` and `batch_norm` (the crate's `PATCH.md`),
//! which compute in f32 only.

use alloc::vec::Vec;
use burn_backend::DType;
use burn_std::{Bytes, Shape};

use crate::{FlexTensor, Layout};

/// A contiguous view of an f32 tensor, to read as a slice.
pub(crate) fn contiguous(tensor: &FlexTensor) -> FlexTensor {
    debug_assert_eq!(tensor.dtype(), DType::F32);
    tensor.to_contiguous()
}

/// `values` as a contiguous f32 tensor of `shape`.
pub(crate) fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
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
