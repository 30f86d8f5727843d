// Alveolus: LibTorch's own convolution and batch-norm backward (the kernels PyTorch's autograd
// runs: oneDNN or cuDNN), which tch 0.22 does not wrap because they take a
// `std::array<bool, 3>`.
//
// Without them burn computes a weight gradient as a forward convolution whose kernel is the
// output gradient (256x256 at a U-Net's first level), which no convolution library is made for,
// and a batch norm's gradient as a dozen separate passes over the activation.
#include <ATen/ATen.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/native_batch_norm_backward.h>

#include <cstdlib>
#include <cstring>

extern "C" {

// Writes the gradient of `input` (which == 0) or of `weight` (which == 1) of a convolution
// (transposed or not, 1 to 3 spatial dimensions) to `*out`, a new tensor the caller owns.
// Returns null, or an error message allocated with malloc that the caller frees.
char *burn_tch_convolution_backward(at::Tensor **out, const at::Tensor *grad_output,
                                    const at::Tensor *input, const at::Tensor *weight,
                                    const int64_t *stride, const int64_t *padding,
                                    const int64_t *dilation, const int64_t *output_padding,
                                    int dims, int transposed, int64_t groups, int which) {
    try {
        const std::array<bool, 3> mask = {which == 0, which == 1, false};
        auto grads = at::convolution_backward(
            *grad_output, *input, *weight, std::nullopt, at::IntArrayRef(stride, dims),
            at::IntArrayRef(padding, dims), at::IntArrayRef(dilation, dims), transposed != 0,
            at::IntArrayRef(output_padding, dims), groups, mask);
        *out = new at::Tensor(which == 0 ? std::get<0>(grads) : std::get<1>(grads));
        return nullptr;
    } catch (const std::exception &e) {
        return strdup(e.what());
    }
}

// Writes the gradients of a training-mode batch norm's input, weight and bias to `out[0..3]`,
// new tensors the caller owns, from the batch statistics its forward used (`mean` and
// `invstd` = 1 / sqrt(variance + eps), per channel). Returns as above.
char *burn_tch_batch_norm_backward(at::Tensor **out, const at::Tensor *grad_output,
                                   const at::Tensor *input, const at::Tensor *weight,
                                   const at::Tensor *mean, const at::Tensor *invstd, double eps) {
    try {
        auto grads = at::native_batch_norm_backward(*grad_output, *input, *weight, std::nullopt,
                                                    std::nullopt, *mean, *invstd, true, eps,
                                                    {true, true, true});
        out[0] = new at::Tensor(std::get<0>(grads));
        out[1] = new at::Tensor(std::get<1>(grads));
        out[2] = new at::Tensor(std::get<2>(grads));
        return nullptr;
    } catch (const std::exception &e) {
        return strdup(e.what());
    }
}
}
