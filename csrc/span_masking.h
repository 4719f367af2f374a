// spanbert_fast::span_masking (and its test-only companions): declarations shared by the
// CPU ops, the CUDA wrapper and the registration (extension.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "span_masking_core.h"

namespace spanbert_fast {

// The op's scalar arguments as they come from the schema (see extension.cpp).
struct SpanMaskingArguments {
  int64_t seed;
  int64_t mask_token_id;
  int64_t mask_ratio_numerator;
  int64_t mask_ratio_denominator;
  std::vector<int64_t> span_word_thresholds;
  int64_t mask_threshold;
  int64_t random_threshold;
  int64_t max_span_len;
  bool sbo_special_boundaries;
};

// Checks every argument of span_masking (dtypes, ranks, shapes, devices, ranges of the
// scalars and tables) with an error that names it, TORCH_CHECK_TYPE for a dtype (Python's
// TypeError) and TORCH_CHECK_VALUE for the rest (ValueError), and returns the kernel
// parameters. The id range is checked by the kernels while they run.
core::SpanMaskingParams check_span_masking_inputs(
    const at::Tensor& input_ids, const at::Tensor& token_flags,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& word_starts, const at::Tensor& offsets,
    const std::optional<at::Tensor>& unigram_cdf, const SpanMaskingArguments& arguments);

// One span_masking call after the device-independent part: the inputs checked and made
// contiguous on their device (the mask as bool), the two (batch, seq) outputs allocated,
// and the kernels' view of them in `tensors` (pointers into the tensors held here;
// sbo_counts is left null for the device half, whose storage for it differs).
struct PreparedSpanMasking {
  core::SpanMaskingParams params;
  at::Tensor ids, flags, mask, starts, row_offsets, cdf, masked_ids, labels;
  core::SpanMaskingTensors tensors;
};

// Raises the error (a ValueError in Python) for an id outside [0, vocab_size) at flat
// index `flat_index`.
void raise_span_masking_id_out_of_range(const at::Tensor& input_ids, int64_t vocab_size,
                                        int64_t flat_index);

// (masked_ids, labels, sbo_targets): (batch, seq), (batch, seq) and (N, 5) int64,
// contiguous; sbo_targets rows (row, left, right, rel_pos, label) sorted by row, position.
using SpanMaskingResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// spanbert_fast::span_masking, one implementation registered for CPU and CUDA: the checks
// and the preparation, then the device half (a non-empty batch only).
SpanMaskingResult span_masking(
    const at::Tensor& input_ids, const at::Tensor& token_flags,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& word_starts, const at::Tensor& offsets,
    const std::optional<at::Tensor>& unigram_cdf, int64_t seed, int64_t mask_token_id,
    int64_t mask_ratio_numerator, int64_t mask_ratio_denominator,
    c10::IntArrayRef span_word_thresholds, int64_t mask_threshold, int64_t random_threshold,
    int64_t max_span_len, bool sbo_special_boundaries);

#ifdef SBF_WITH_CUDA
// The CUDA half (extension.cpp), called with the device guard of the inputs held.
SpanMaskingResult span_masking_cuda(PreparedSpanMasking& prepared);
#endif

// Test-only: (len(offsets), count) int64 span lengths in words, drawn by the sampler's own
// draw_span_words from the stream of (seed, offset) of each row.
at::Tensor sample_span_lengths_cpu(int64_t seed, const at::Tensor& offsets, int64_t count,
                                   c10::IntArrayRef span_word_thresholds);

// Test-only: Philox4x32-10 blocks. counter (n, 4) and key (n, 2) int64 holding uint32
// values -> (n, 4) int64 holding the uint32 outputs.
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key);

}  // namespace spanbert_fast
