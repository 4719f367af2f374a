// Registration of the spanbert_fast operators, the input checks of word_starts, and the
// torch-facing wrappers of the CUDA kernels (compiled only when SBF_WITH_CUDA is defined).
//
// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: the `spanbert_fast` namespace is shared with
// the ops that spanbert_fast/ops.py registers from Python through torch.library.custom_op.
// The fake (meta) implementations, which torch.compile traces, are registered from Python
// in spanbert_fast/_C.py.
#include <torch/library.h>

#include <ATen/core/Tensor.h>

#include "span_masking.h"
#include "span_masking_core.h"
#include "word_starts.h"

#ifdef SBF_WITH_CUDA
#include <ATen/ops/cat.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

// Defined in word_starts_cuda.cu; see there for the contract.
extern "C" int sbf_word_starts_cuda_launch(const int64_t* input_ids,
                                           const bool* is_continuation,
                                           int64_t table_size,
                                           const bool* attention_mask,
                                           bool* out,
                                           unsigned long long* first_bad_index,
                                           int64_t numel,
                                           void* stream);

// Defined in span_masking_cuda.cu; see there for the contract.
extern "C" int sbf_span_masking_cuda_launch(const spanbert_fast::core::SpanMaskingParams* params,
                                            const spanbert_fast::core::SpanMaskingTensors* tensors,
                                            int32_t* maskable_positions,
                                            uint8_t* position_flags,
                                            unsigned long long* first_bad_index,
                                            void* stream);
extern "C" int sbf_sbo_targets_cuda_launch(const spanbert_fast::core::SpanMaskingParams* params,
                                           const spanbert_fast::core::SpanMaskingTensors* tensors,
                                           const int64_t* first_target,
                                           int64_t* sbo_targets,
                                           void* stream);
#endif

namespace spanbert_fast {

void check_word_starts_inputs(const at::Tensor& input_ids,
                              const at::Tensor& is_continuation,
                              const std::optional<at::Tensor>& attention_mask) {
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong,
                   "word_starts: input_ids must be int64 (torch.long), got ",
                   input_ids.scalar_type());
  TORCH_CHECK_VALUE(input_ids.dim() == 2,
                    "word_starts: input_ids must be 2-D (batch, seq), got shape ",
                    input_ids.sizes());
  TORCH_CHECK_TYPE(is_continuation.scalar_type() == at::kBool,
                   "word_starts: is_continuation must be bool (one flag per vocabulary entry), "
                   "got ", is_continuation.scalar_type());
  TORCH_CHECK_VALUE(is_continuation.dim() == 1,
                    "word_starts: is_continuation must be 1-D (vocab_size,), got shape ",
                    is_continuation.sizes());
  TORCH_CHECK_VALUE(is_continuation.device() == input_ids.device(),
                    "word_starts: is_continuation must be on the device of input_ids (",
                    input_ids.device(), "), got ", is_continuation.device());
  if (!attention_mask.has_value()) {
    return;
  }
  const at::Tensor& mask = *attention_mask;
  TORCH_CHECK_VALUE(mask.sizes() == input_ids.sizes(),
                    "word_starts: attention_mask must have the shape of input_ids ",
                    input_ids.sizes(), ", got ", mask.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(mask.scalar_type(), /*includeBool=*/true),
                   "word_starts: attention_mask must be bool or an integer dtype "
                   "(nonzero = real token), got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == input_ids.device(),
                    "word_starts: attention_mask must be on the device of input_ids (",
                    input_ids.device(), "), got ", mask.device());
}

at::Tensor attention_mask_as_bool(const std::optional<at::Tensor>& attention_mask) {
  if (!attention_mask.has_value()) {
    return at::Tensor();
  }
  const at::Tensor& mask = *attention_mask;
  // ne() keeps the strides of a dense non-contiguous mask (e.g. a transposed one), and the
  // kernels read the mask as row-major: both branches must be contiguous.
  return mask.scalar_type() == at::kBool ? mask.contiguous() : mask.ne(0).contiguous();
}

void raise_token_id_out_of_range(const at::Tensor& input_ids, int64_t table_size,
                                 int64_t flat_index) {
  // Word for word the error of spanbert_fast.masking.word_starts' own check, which runs
  // first except while torch.compile traces.
  const int64_t seq = input_ids.size(1);
  const int64_t value = input_ids.reshape({-1}).select(0, flat_index).item<int64_t>();
  TORCH_CHECK_VALUE(false, "input_ids must be in [0, ", table_size,
                    ") (the length of is_continuation), got ", value, " at position (",
                    flat_index / seq, ", ", flat_index % seq, "); values span [",
                    input_ids.min().item<int64_t>(), ", ", input_ids.max().item<int64_t>(), "]");
}

#ifdef SBF_WITH_CUDA
at::Tensor word_starts_cuda(const at::Tensor& input_ids, const at::Tensor& is_continuation,
                            const std::optional<at::Tensor>& attention_mask) {
  check_word_starts_inputs(input_ids, is_continuation, attention_mask);
  const c10::cuda::CUDAGuard device_guard(input_ids.device());
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor table = is_continuation.contiguous();
  const at::Tensor mask = attention_mask_as_bool(attention_mask);
  at::Tensor out = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
  if (out.numel() == 0) {
    return out;
  }
  at::Tensor first_bad_index = at::full({1}, core::kNoBadIndex, ids.options());
  const int error = sbf_word_starts_cuda_launch(
      ids.const_data_ptr<int64_t>(), table.const_data_ptr<bool>(), table.numel(),
      mask.defined() ? mask.const_data_ptr<bool>() : nullptr, out.mutable_data_ptr<bool>(),
      reinterpret_cast<unsigned long long*>(first_bad_index.mutable_data_ptr<int64_t>()),
      ids.numel(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == 0, "word_starts: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
  // One device-to-host copy (a sync): the price of reporting a bad id as an error rather
  // than a device assert.
  const int64_t bad = first_bad_index.item<int64_t>();
  if (bad != core::kNoBadIndex) {
    raise_token_id_out_of_range(ids, table.numel(), bad);
  }
  return out;
}

SpanMaskingResult span_masking_cuda(PreparedSpanMasking& prepared) {
  const core::SpanMaskingParams& params = prepared.params;
  const at::Tensor& ids = prepared.ids;
  at::Tensor sbo_counts = at::empty({params.batch}, ids.options());
  at::Tensor maskable_positions = at::empty(ids.sizes(), ids.options().dtype(at::kInt));
  at::Tensor position_flags = at::empty(ids.sizes(), ids.options().dtype(at::kByte));
  at::Tensor first_bad_index = at::full({1}, core::kNoBadIndex, ids.options());

  core::SpanMaskingTensors& tensors = prepared.tensors;
  tensors.sbo_counts = sbo_counts.mutable_data_ptr<int64_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  int error = sbf_span_masking_cuda_launch(
      &params, &tensors, maskable_positions.mutable_data_ptr<int32_t>(),
      position_flags.mutable_data_ptr<uint8_t>(),
      reinterpret_cast<unsigned long long*>(first_bad_index.mutable_data_ptr<int64_t>()),
      stream);
  TORCH_CHECK(error == 0, "span_masking: CUDA kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(error)));
  // Each row's place in the flat SBO table, and one device-to-host copy (the op's only
  // sync): the number of targets, which sizes the output, and the first bad id, which
  // becomes an error that names its position instead of a device assert.
  const at::Tensor ends = at::cumsum(sbo_counts, 0);
  const at::Tensor first_target = ends.sub(sbo_counts);
  const at::Tensor summary = at::cat({ends.slice(0, params.batch - 1), first_bad_index}).cpu();
  const int64_t total = summary[0].item<int64_t>();
  const int64_t bad = summary[1].item<int64_t>();
  if (bad != core::kNoBadIndex) {
    raise_span_masking_id_out_of_range(ids, params.vocab_size, bad);
  }
  at::Tensor sbo_targets = at::empty({total, 5}, ids.options());
  if (total > 0) {
    error = sbf_sbo_targets_cuda_launch(&params, &tensors, first_target.const_data_ptr<int64_t>(),
                                        sbo_targets.mutable_data_ptr<int64_t>(), stream);
    TORCH_CHECK(error == 0, "span_masking: CUDA kernel launch failed (SBO targets): ",
                cudaGetErrorString(static_cast<cudaError_t>(error)));
  }
  return {prepared.masked_ids, prepared.labels, sbo_targets};
}
#endif

}  // namespace spanbert_fast

TORCH_LIBRARY_FRAGMENT(spanbert_fast, m) {
  m.def(
      "word_starts(Tensor input_ids, Tensor is_continuation, Tensor? attention_mask=None) "
      "-> Tensor");
  // The span-masking sampler; spanbert_fast/masking.py (SpanMasker) documents the
  // arguments and builds the tables and thresholds. Outputs, int64: the masked ids and the
  // MLM labels (-100 = not masked), (batch, seq) each, and the SBO targets (N, 5) rows
  // (row, left, right, rel_pos, label), by row then position (N depends on the data).
  // sbo_special_boundaries: false (the original's rule) = a span's two boundaries must be
  // maskable tokens (never [CLS]/[SEP]); true = any real token.
  m.def(
      "span_masking(Tensor input_ids, Tensor token_flags, Tensor? attention_mask, "
      "Tensor? word_starts, Tensor offsets, Tensor? unigram_cdf, int seed, int mask_token_id, "
      "int mask_ratio_numerator, int mask_ratio_denominator, int[] span_word_thresholds, "
      "int mask_threshold, int random_threshold, int max_span_len, "
      "bool sbo_special_boundaries=False) "
      "-> (Tensor masked_ids, Tensor labels, Tensor sbo_targets)");
  // Test-only: the span lengths (in words) that the sampler's own draw function gives the
  // stream (seed, offset), before any merging; (len(offsets), count) int64, CPU.
  m.def(
      "sample_span_lengths(int seed, Tensor offsets, int count, int[] span_word_thresholds) "
      "-> Tensor");
  // Test-only: raw Philox4x32-10 blocks, for the known-answer test.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
}

TORCH_LIBRARY_IMPL(spanbert_fast, CPU, m) {
  m.impl("word_starts", &spanbert_fast::word_starts_cpu);
  m.impl("span_masking", &spanbert_fast::span_masking);
  m.impl("sample_span_lengths", &spanbert_fast::sample_span_lengths_cpu);
  m.impl("philox4x32_10", &spanbert_fast::philox4x32_10_cpu);
}

#ifdef SBF_WITH_CUDA
TORCH_LIBRARY_IMPL(spanbert_fast, CUDA, m) {
  m.impl("word_starts", &spanbert_fast::word_starts_cuda);
  m.impl("span_masking", &spanbert_fast::span_masking);
}
#endif
