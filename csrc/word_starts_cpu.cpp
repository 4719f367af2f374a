// CPU implementation of spanbert_fast::word_starts: rows split across threads with
// at::parallel_for, the per-element logic from span_masking_core.h.
#include "word_starts.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>

#include "span_masking_core.h"

namespace spanbert_fast {

namespace {

// Elements per task: below this, starting a thread costs more than the loop (the same
// threshold ATen uses for its elementwise CPU kernels).
constexpr int64_t kGrainElements = 32768;

void lower_to(std::atomic<int64_t>& target, int64_t value) {
  int64_t current = target.load(std::memory_order_relaxed);
  while (value < current &&
         !target.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

}  // namespace

at::Tensor word_starts_cpu(const at::Tensor& input_ids, const at::Tensor& is_continuation,
                           const std::optional<at::Tensor>& attention_mask) {
  check_word_starts_inputs(input_ids, is_continuation, attention_mask);
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor table = is_continuation.contiguous();
  const at::Tensor mask = attention_mask_as_bool(attention_mask);
  at::Tensor out = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
  const int64_t batch = ids.size(0);
  const int64_t seq = ids.size(1);
  if (out.numel() == 0) {
    return out;
  }

  const int64_t* ids_ptr = ids.const_data_ptr<int64_t>();
  const bool* table_ptr = table.const_data_ptr<bool>();
  const bool* mask_ptr = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  bool* out_ptr = out.mutable_data_ptr<bool>();
  const int64_t table_size = table.numel();

  std::atomic<int64_t> first_bad_index{core::kNoBadIndex};
  const int64_t grain_rows = std::max<int64_t>(1, kGrainElements / seq);
  at::parallel_for(0, batch, grain_rows, [&](int64_t row_begin, int64_t row_end) {
    int64_t local_first_bad = core::kNoBadIndex;
    for (int64_t i = row_begin * seq; i < row_end * seq; ++i) {
      if (!core::write_word_start(ids_ptr, table_ptr, table_size, mask_ptr, i, out_ptr) &&
          local_first_bad == core::kNoBadIndex) {
        local_first_bad = i;
      }
    }
    lower_to(first_bad_index, local_first_bad);
  });

  const int64_t bad = first_bad_index.load();
  if (bad != core::kNoBadIndex) {
    raise_token_id_out_of_range(ids, table_size, bad);
  }
  return out;
}

}  // namespace spanbert_fast
