// The racecheck build's self-check (scripts/racecheck.sh, built only with -DLABELKIT_RACECHECK=ON):
// one kernel that races on shared memory unless told to wait at a barrier. ThreadSanitizer must
// report the race in the first call and nothing in the second, or the racecheck run proves
// nothing. Written as CUDA and translated like csrc/ops/cuda (translate.py).
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 64;

// out[i] = i + 1 mod 64, read from the neighbour's slot of shared memory.
__global__ void read_neighbour(float* out, bool barrier) {
  __shared__ float slots[kThreads];
  const int i = threadIdx.x;
  slots[i] = static_cast<float>(i);
  if (barrier) __syncthreads();
  out[i] = slots[(i + 1) % kThreads];
}

at::Tensor read_neighbours(bool barrier) {
  at::Tensor out = at::empty({kThreads}, at::kFloat);
  read_neighbour<<<1, kThreads>>>(out.data_ptr<float>(), barrier);
  return out;
}

}  // namespace

TORCH_LIBRARY(cuemu_racecheck, m) {
  m.def("read_neighbours(bool barrier) -> Tensor", &read_neighbours);
}
