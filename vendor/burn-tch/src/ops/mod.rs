mod activation;
mod base;
mod bool_tensor;
#[cfg(libtorch_native_backward)]
mod native_backward;
mod int_tensor;
mod module;
mod qtensor;
mod tensor;
mod transaction;

pub(crate) use base::*;
