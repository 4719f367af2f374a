// CUDA kernel for spanbert_fast::span_masking and its plain C launcher.
//
// No torch headers: the launcher takes the parameter structs of span_masking_core.h, raw
// device pointers and a stream, so this file compiles with `nvcc -c` on a machine without
// a CUDA build of torch (see .ci/run). The torch-facing wrapper (input checks, allocation,
// stream, the error for a bad id) is in extension.cpp.
//
// One thread per sequence runs core::mask_row, the function the CPU op runs, so a
// sequence gets the bit-identical result on both. The sampling loop is sequential by
// nature (each span depends on what is already masked); a batch of 4096 sequences gives
// 4096 independent threads.
#include <cuda_runtime.h>

#include "span_masking_core.h"

namespace {

// Small blocks spread a batch of a few thousand sequences over every SM (132 on an H100)
// instead of packing them onto a few.
constexpr int kThreadsPerBlock = 32;

__global__ void span_masking_kernel(const spanbert_fast::core::SpanMaskingParams params,
                                    const spanbert_fast::core::SpanMaskingTensors tensors,
                                    int32_t* __restrict__ maskable_positions,
                                    uint8_t* __restrict__ position_flags,
                                    unsigned long long* __restrict__ first_bad_index) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= params.batch) {
    return;
  }
  const spanbert_fast::core::RowScratch scratch{maskable_positions + row * params.seq,
                                                position_flags + row * params.seq};
  const int64_t bad = spanbert_fast::core::mask_row(params, tensors, row, scratch);
  if (bad != spanbert_fast::core::kNoBadIndex) {
    atomicMin(first_bad_index, static_cast<unsigned long long>(bad));
  }
}

__global__ void sbo_targets_kernel(const spanbert_fast::core::SpanMaskingParams params,
                                   const spanbert_fast::core::SpanMaskingTensors tensors,
                                   const int64_t* __restrict__ first_target,
                                   int64_t* __restrict__ sbo_targets) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < params.batch) {
    spanbert_fast::core::write_sbo_targets(params, tensors, row, first_target[row], sbo_targets);
  }
}

unsigned int blocks_for_rows(int64_t batch) {
  return static_cast<unsigned int>((batch + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

}  // namespace

// Launches span_masking over params->batch sequences on `stream` (a cudaStream_t).
//
//   params              sizes and scalar parameters (copied into the kernel's arguments)
//   tensors             device pointers, see SpanMaskingTensors (outputs and the per-row
//                       SBO scratch included)
//   maskable_positions  (batch, seq) int32 device workspace
//   position_flags      (batch, seq) uint8 device workspace
//   first_bad_index     one uint64 on the device, preset to INT64_MAX by the caller;
//                       lowered to the smallest flat index whose id is out of range
//
// Returns the cudaError_t of the launch (0 = cudaSuccess). Asynchronous.
extern "C" int sbf_span_masking_cuda_launch(const spanbert_fast::core::SpanMaskingParams* params,
                                            const spanbert_fast::core::SpanMaskingTensors* tensors,
                                            int32_t* maskable_positions,
                                            uint8_t* position_flags,
                                            unsigned long long* first_bad_index,
                                            void* stream) {
  if (params->batch <= 0 || params->seq <= 0) {
    return static_cast<int>(cudaSuccess);
  }
  if (params->batch > 0x7FFFFFFFLL * kThreadsPerBlock) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  span_masking_kernel<<<blocks_for_rows(params->batch), kThreadsPerBlock, 0,
                        static_cast<cudaStream_t>(stream)>>>(
      *params, *tensors, maskable_positions, position_flags, first_bad_index);
  return static_cast<int>(cudaGetLastError());
}

// Launches the second step after span_masking: row r writes its tensors->sbo_counts[r]
// targets from row first_target[r] (an exclusive prefix sum of the counts, on the device)
// of the (N, 5) int64 device table sbo_targets. Returns the launch's cudaError_t.
extern "C" int sbf_sbo_targets_cuda_launch(const spanbert_fast::core::SpanMaskingParams* params,
                                           const spanbert_fast::core::SpanMaskingTensors* tensors,
                                           const int64_t* first_target,
                                           int64_t* sbo_targets,
                                           void* stream) {
  if (params->batch <= 0 || params->seq <= 0) {
    return static_cast<int>(cudaSuccess);
  }
  sbo_targets_kernel<<<blocks_for_rows(params->batch), kThreadsPerBlock, 0,
                       static_cast<cudaStream_t>(stream)>>>(*params, *tensors, first_target,
                                                            sbo_targets);
  return static_cast<int>(cudaGetLastError());
}
