// CUDA kernel for spanbert_fast::word_starts and its plain C launcher.
//
// No torch headers: the launcher takes raw pointers, sizes and a stream, so this file
// compiles with `nvcc -c` on a machine without a CUDA build of torch (see .ci/run).
// The torch-facing wrapper (input checks, allocation, stream) is in extension.cpp.
#include <cuda_runtime.h>

#include "span_masking_core.h"

namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; the grid-stride loop
// covers larger inputs.
constexpr int64_t kMaxBlocks = 65535;

__global__ void word_starts_kernel(const int64_t* __restrict__ input_ids,
                                   const bool* __restrict__ is_continuation,
                                   int64_t table_size,
                                   const bool* __restrict__ attention_mask,
                                   bool* __restrict__ out,
                                   unsigned long long* __restrict__ first_bad_index,
                                   int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    if (!spanbert_fast::core::write_word_start(input_ids, is_continuation, table_size,
                                               attention_mask, i, out)) {
      atomicMin(first_bad_index, static_cast<unsigned long long>(i));
    }
  }
}

}  // namespace

// Launches word_starts over `numel` contiguous elements on `stream` (a cudaStream_t).
//
//   input_ids        (numel,) int64, device
//   is_continuation  (table_size,) bool, device
//   attention_mask   (numel,) bool, device, or nullptr
//   out              (numel,) bool, device
//   first_bad_index  one uint64 on the device, preset to INT64_MAX by the caller; lowered
//                    to the smallest flat index whose id is outside [0, table_size)
//
// Returns the cudaError_t of the launch (0 = cudaSuccess). Asynchronous: the caller
// reads first_bad_index after the stream has run the kernel.
extern "C" int sbf_word_starts_cuda_launch(const int64_t* input_ids,
                                           const bool* is_continuation,
                                           int64_t table_size,
                                           const bool* attention_mask,
                                           bool* out,
                                           unsigned long long* first_bad_index,
                                           int64_t numel,
                                           void* stream) {
  if (numel <= 0) {
    return static_cast<int>(cudaSuccess);
  }
  int64_t blocks = (numel + kThreadsPerBlock - 1) / kThreadsPerBlock;
  if (blocks > kMaxBlocks) {
    blocks = kMaxBlocks;
  }
  word_starts_kernel<<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0,
                       static_cast<cudaStream_t>(stream)>>>(
      input_ids, is_continuation, table_size, attention_mask, out, first_bad_index, numel);
  return static_cast<int>(cudaGetLastError());
}
