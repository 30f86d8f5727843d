// LibTorch's own convolution backward (the kernels PyTorch's autograd runs: oneDNN on CPU,
// cuDNN on CUDA), which tch 0.22 does not wrap because it takes a `std::array<bool, 3>`.
//
// Without it burn computes a weight gradient as a forward convolution whose kernel is the
// output gradient (256x256 at a U-Net's first level), which no convolution library is made for.
#include <ATen/ATen.h>
#include <ATen/ops/convolution_backward.h>

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
}
