// Per-element logic of the span-masking sampler, shared by the host (CPU op) and the
// device (CUDA kernel) so both compute exactly the same thing.
//
// Plain C++17: no torch and no CUDA runtime headers, so a .cu file that includes it
// compiles with `nvcc -c` alone (CI has nvcc but no CUDA build of torch).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SBF_HOST_DEVICE __host__ __device__
#else
#define SBF_HOST_DEVICE
#endif

namespace spanbert_fast {
namespace core {

// Whether `token_id` can index a table of `table_size` entries.
SBF_HOST_DEVICE inline bool token_id_in_range(int64_t token_id, int64_t table_size) {
  return token_id >= 0 && token_id < table_size;
}

// Writes out[i] = "position i starts a word": the token is real (attention_mask[i] is
// true, or there is no mask) and it is not a `##` WordPiece continuation
// (is_continuation[input_ids[i]] is false).
//
// Returns false when input_ids[i] is outside [0, table_size); out[i] is then false and
// the table is not read, so a bad id can never read out of bounds. The caller turns a
// false into an error that names the position.
//
//   input_ids        (n,) token ids, contiguous
//   is_continuation  (table_size,) one flag per vocabulary entry
//   attention_mask   (n,) or nullptr (every position is real)
//   out              (n,)
SBF_HOST_DEVICE inline bool write_word_start(const int64_t* input_ids,
                                             const bool* is_continuation,
                                             int64_t table_size,
                                             const bool* attention_mask,
                                             int64_t i,
                                             bool* out) {
  const int64_t token_id = input_ids[i];
  const bool in_range = token_id_in_range(token_id, table_size);
  const bool is_real = attention_mask == nullptr || attention_mask[i];
  // && short-circuits: the table is read only for an id in range.
  out[i] = is_real && in_range && !is_continuation[token_id];
  return in_range;
}

// No out-of-range id seen yet (the value a "first bad index" starts from).
constexpr int64_t kNoBadIndex = INT64_MAX;

}  // namespace core
}  // namespace spanbert_fast
