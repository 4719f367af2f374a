// spanbert_fast::word_starts: declarations shared by the CPU op, the CUDA wrapper and the
// registration (extension.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace spanbert_fast {

// Checks dtypes, ranks, shapes and devices (not the id range, which the kernels check
// while they run). Raises c10::Error (RuntimeError in Python) naming the argument, what
// was expected and what it got.
void check_word_starts_inputs(const at::Tensor& input_ids,
                              const at::Tensor& is_continuation,
                              const std::optional<at::Tensor>& attention_mask);

// The mask as a contiguous bool tensor (nonzero = real token), or an undefined tensor
// when there is no mask.
at::Tensor attention_mask_as_bool(const std::optional<at::Tensor>& attention_mask);

// Raises the error for an id outside [0, table_size) at flat index `flat_index` of the
// contiguous (batch, seq) tensor `input_ids`.
void raise_token_id_out_of_range(const at::Tensor& input_ids, int64_t table_size,
                                 int64_t flat_index);

// input_ids (batch, seq) int64, is_continuation (vocab,) bool, attention_mask (batch, seq)
// bool/integer or None -> (batch, seq) bool, contiguous.
at::Tensor word_starts_cpu(const at::Tensor& input_ids, const at::Tensor& is_continuation,
                           const std::optional<at::Tensor>& attention_mask);

#ifdef SBF_WITH_CUDA
at::Tensor word_starts_cuda(const at::Tensor& input_ids, const at::Tensor& is_continuation,
                            const std::optional<at::Tensor>& attention_mask);
#endif

}  // namespace spanbert_fast
