// Argument checks shared by the CPU and CUDA kernels of the affine grid-sample op. The messages
// match the Python wrapper's (labelkit_ext/ops/affine.py), which checks first with the same words.
#pragma once

#include <ATen/ATen.h>

namespace labelkit {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_affine_args(
    const at::Tensor& input, const at::Tensor& theta, int64_t out_h, int64_t out_w, int64_t mode, int64_t padding_mode) {
  constexpr const char* op = "affine_grid_sample";
  TORCH_CHECK(
      is_float_dtype(input.scalar_type()), op,
      ": input must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      input.scalar_type());
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D [N, C, H, W], got shape ", input.sizes());
  TORCH_CHECK(
      input.size(2) >= 1 && input.size(3) >= 1, op, ": input must have H >= 1 and W >= 1, got shape ",
      input.sizes());
  TORCH_CHECK(
      is_float_dtype(theta.scalar_type()), op,
      ": theta must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      theta.scalar_type());
  TORCH_CHECK(
      (theta.scalar_type() == at::kDouble) == (input.scalar_type() == at::kDouble), op, ": theta dtype ",
      theta.scalar_type(), " does not match input dtype ", input.scalar_type(),
      " (float64 must be used for both or neither)");
  TORCH_CHECK(
      theta.device() == input.device(), op, ": theta must be on the input's device (", input.device(),
      "), got ", theta.device());
  TORCH_CHECK(
      theta.dim() == 3 && theta.size(1) == 2 && theta.size(2) == 3, op,
      ": theta must have shape [N, 2, 3], got ", theta.sizes());
  TORCH_CHECK(
      theta.size(0) == input.size(0), op, ": theta has ", theta.size(0), " matrices but input has N = ",
      input.size(0), " images");
  TORCH_CHECK(out_h > 0 && out_w > 0, op, ": size entries must be positive, got (", out_h, ", ", out_w, ")");
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (bilinear) or 1 (nearest), got ", mode);
  TORCH_CHECK(
      padding_mode >= 0 && padding_mode <= 2, op,
      ": padding_mode must be 0 (zeros), 1 (border) or 2 (reflection), got ", padding_mode);
}

inline void check_affine_grad(const at::Tensor& grad, const at::Tensor& input, const char* op) {
  TORCH_CHECK(
      grad.dim() == 4 && grad.size(0) == input.size(0) && grad.size(1) == input.size(1), op,
      ": grad must have shape [N, C, Ho, Wo] = [", input.size(0), ", ", input.size(1), ", Ho, Wo], got ",
      grad.sizes());
  TORCH_CHECK(grad.device() == input.device(), op, ": grad must be on the input's device");
}

// Channels-last when the input is (and is not also contiguous): the output keeps that layout.
inline at::MemoryFormat affine_memory_format(const at::Tensor& input) {
  return input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

}  // namespace labelkit
