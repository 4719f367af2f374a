// spanbert_fast::span_masking: the input checks and preparation shared by both devices,
// the CPU half (sequences split across threads with at::parallel_for, the per-sequence
// sampler from span_masking_core.h; the CUDA half is in extension.cpp), and the test-only
// ops sample_span_lengths and philox4x32_10.
#include "span_masking.h"
#include "word_starts.h"  // attention_mask_as_bool

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace spanbert_fast {

namespace {

// Sequences per task: one 512-token sequence takes a few microseconds, so smaller tasks
// would spend more on scheduling than on sampling.
constexpr int64_t kGrainTokens = 16384;

void lower_to(std::atomic<int64_t>& target, int64_t value) {
  int64_t current = target.load(std::memory_order_relaxed);
  while (value < current &&
         !target.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
  }
}

void check_same_device(const at::Tensor& tensor, const char* name, const at::Tensor& input_ids) {
  TORCH_CHECK_VALUE(tensor.device() == input_ids.device(), "span_masking: ", name,
                    " must be on the device of input_ids (", input_ids.device(), "), got ",
                    tensor.device());
}

void check_probability_threshold(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0 && value <= core::kProbabilityOne, "span_masking: ", name,
                    " must be in [0, 2^32] (a probability times 2^32), got ", value);
}

std::vector<int64_t> checked_span_word_thresholds(c10::IntArrayRef thresholds,
                                                  const char* op) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(thresholds.size()) < core::kMaxSpanWords, op,
                    ": span_word_thresholds must have max_span_words - 1 entries, at most ",
                    core::kMaxSpanWords - 1, ", got ", thresholds.size());
  int64_t previous = 0;
  for (size_t k = 0; k < thresholds.size(); ++k) {
    TORCH_CHECK_VALUE(thresholds[k] >= previous && thresholds[k] <= core::kProbabilityOne, op,
                      ": span_word_thresholds must be non-decreasing in [0, 2^32] (the CDF of the "
                      "span length in words, times 2^32), got ", thresholds, " (entry ", k, ")");
    previous = thresholds[k];
  }
  return std::vector<int64_t>(thresholds.begin(), thresholds.end());
}

}  // namespace

core::SpanMaskingParams check_span_masking_inputs(
    const at::Tensor& input_ids, const at::Tensor& token_flags,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& word_starts, const at::Tensor& offsets,
    const std::optional<at::Tensor>& unigram_cdf, const SpanMaskingArguments& arguments) {
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong,
                   "span_masking: input_ids must be int64 (torch.long), got ",
                   input_ids.scalar_type());
  TORCH_CHECK_VALUE(input_ids.dim() == 2,
                    "span_masking: input_ids must be 2-D (batch, seq), got shape ",
                    input_ids.sizes());
  TORCH_CHECK_VALUE(input_ids.size(1) <= INT32_MAX,
                    "span_masking: input_ids must have at most 2^31 - 1 positions per "
                    "sequence, got ", input_ids.size(1));
  TORCH_CHECK_TYPE(token_flags.scalar_type() == at::kByte,
                   "span_masking: token_flags must be uint8 (bit 0: ## continuation, bit 1: "
                   "special token), got ", token_flags.scalar_type());
  TORCH_CHECK_VALUE(token_flags.dim() == 1 && token_flags.numel() >= 1 &&
                        token_flags.numel() <= INT32_MAX,
                    "span_masking: token_flags must be 1-D (vocab_size,) with "
                    "1 <= vocab_size < 2^31, got shape ", token_flags.sizes());
  check_same_device(token_flags, "token_flags", input_ids);
  const int64_t vocab_size = token_flags.numel();
  if (attention_mask.has_value()) {
    const at::Tensor& mask = *attention_mask;
    TORCH_CHECK_VALUE(mask.sizes() == input_ids.sizes(),
                      "span_masking: attention_mask must have the shape of input_ids ",
                      input_ids.sizes(), ", got ", mask.sizes());
    TORCH_CHECK_TYPE(at::isIntegralType(mask.scalar_type(), /*includeBool=*/true),
                     "span_masking: attention_mask must be bool or an integer dtype "
                     "(nonzero = real token), got ", mask.scalar_type());
    check_same_device(mask, "attention_mask", input_ids);
  }
  if (word_starts.has_value()) {
    TORCH_CHECK_TYPE(word_starts->scalar_type() == at::kBool,
                     "span_masking: word_starts must be bool, got ", word_starts->scalar_type());
    TORCH_CHECK_VALUE(word_starts->sizes() == input_ids.sizes(),
                      "span_masking: word_starts must have the shape of input_ids ",
                      input_ids.sizes(), ", got ", word_starts->sizes());
    check_same_device(*word_starts, "word_starts", input_ids);
  }
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong,
                   "span_masking: offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == input_ids.size(0),
                    "span_masking: offsets must be 1-D (batch,) = (", input_ids.size(0),
                    ",), got shape ", offsets.sizes());
  check_same_device(offsets, "offsets", input_ids);
  if (unigram_cdf.has_value()) {
    const at::Tensor& cdf = *unigram_cdf;
    TORCH_CHECK_TYPE(cdf.scalar_type() == at::kLong,
                     "span_masking: unigram_cdf must be int64, got ", cdf.scalar_type());
    TORCH_CHECK_VALUE(cdf.dim() == 1 && cdf.numel() == vocab_size,
                      "span_masking: unigram_cdf must be 1-D (vocab_size,) = (", vocab_size,
                      ",) like token_flags, got shape ", cdf.sizes());
    check_same_device(cdf, "unigram_cdf", input_ids);
    if (cdf.device().is_cpu()) {
      // Bad values cannot read out of bounds (the search stays in [0, vocab_size)); this
      // catches a CDF that was not built as documented. (On CUDA it would cost a sync.)
      const at::Tensor contiguous = cdf.contiguous();
      const int64_t* values = contiguous.const_data_ptr<int64_t>();
      int64_t previous = 0;
      for (int64_t k = 0; k < vocab_size; ++k) {
        TORCH_CHECK_VALUE(values[k] >= previous,
                          "span_masking: unigram_cdf must be non-decreasing, got ", values[k],
                          " after ", previous, " at index ", k);
        previous = values[k];
      }
      TORCH_CHECK_VALUE(previous == core::kProbabilityOne,
                        "span_masking: unigram_cdf must end at 2^32 (a CDF times 2^32), got ",
                        previous);
    }
  }
  TORCH_CHECK_VALUE(arguments.seed >= 0, "span_masking: seed must be >= 0, got ", arguments.seed);
  TORCH_CHECK_VALUE(arguments.mask_token_id >= 0 && arguments.mask_token_id < vocab_size,
                    "span_masking: mask_token_id must be in [0, ", vocab_size,
                    ") (the length of token_flags), got ", arguments.mask_token_id);
  TORCH_CHECK_VALUE(arguments.mask_ratio_denominator >= 1 &&
                        arguments.mask_ratio_denominator <= (int64_t{1} << 24) &&
                        arguments.mask_ratio_numerator >= 0 &&
                        arguments.mask_ratio_numerator <= arguments.mask_ratio_denominator,
                    "span_masking: the mask ratio must be a fraction numerator / denominator "
                    "in [0, 1] with 1 <= denominator <= 2^24, got ",
                    arguments.mask_ratio_numerator, " / ", arguments.mask_ratio_denominator);
  check_probability_threshold(arguments.mask_threshold, "mask_threshold");
  check_probability_threshold(arguments.random_threshold, "random_threshold");
  TORCH_CHECK_VALUE(arguments.mask_threshold <= arguments.random_threshold,
                    "span_masking: random_threshold (cumulative: P(mask) + P(random), times 2^32) "
                    "must be >= mask_threshold, got ", arguments.random_threshold, " < ",
                    arguments.mask_threshold);
  TORCH_CHECK_VALUE(arguments.max_span_len >= 1,
                    "span_masking: max_span_len must be >= 1 (the SBO position table's size), got ",
                    arguments.max_span_len);

  core::SpanMaskingParams params{};
  params.batch = input_ids.size(0);
  params.seq = input_ids.size(1);
  params.vocab_size = vocab_size;
  params.mask_token_id = arguments.mask_token_id;
  params.seed = static_cast<uint64_t>(arguments.seed);
  params.mask_ratio_numerator = arguments.mask_ratio_numerator;
  params.mask_ratio_denominator = arguments.mask_ratio_denominator;
  const std::vector<int64_t> thresholds =
      checked_span_word_thresholds(arguments.span_word_thresholds, "span_masking");
  params.span_word_threshold_count = static_cast<int32_t>(thresholds.size());
  std::copy(thresholds.begin(), thresholds.end(), params.span_word_thresholds);
  params.mask_threshold = arguments.mask_threshold;
  params.random_threshold = arguments.random_threshold;
  params.max_span_len = arguments.max_span_len;
  params.sbo_special_boundaries = arguments.sbo_special_boundaries;
  return params;
}

void raise_span_masking_id_out_of_range(const at::Tensor& input_ids, int64_t vocab_size,
                                        int64_t flat_index) {
  const int64_t seq = input_ids.size(1);
  const int64_t value = input_ids.reshape({-1}).select(0, flat_index).item<int64_t>();
  // Word for word the error of SpanMasker's own check (spanbert_fast/masking.py), which
  // runs instead of this op when the extension is missing: SpanMasker passes it on as is.
  TORCH_CHECK_VALUE(false, "input_ids must be in [0, ", vocab_size, ") (vocab_size), got ", value,
                    " at position (", flat_index / seq, ", ", flat_index % seq, ")");
}

namespace {

SpanMaskingResult span_masking_cpu(PreparedSpanMasking& prepared) {
  const core::SpanMaskingParams& params = prepared.params;
  const at::Tensor& ids = prepared.ids;
  std::vector<int64_t> sbo_counts(params.batch);

  core::SpanMaskingTensors& tensors = prepared.tensors;
  tensors.sbo_counts = sbo_counts.data();

  std::atomic<int64_t> first_bad_index{core::kNoBadIndex};
  const int64_t grain_rows = std::max<int64_t>(1, kGrainTokens / params.seq);
  at::parallel_for(0, params.batch, grain_rows, [&](int64_t row_begin, int64_t row_end) {
    std::vector<int32_t> maskable_positions(params.seq);
    std::vector<uint8_t> position_flags(params.seq);
    const core::RowScratch scratch{maskable_positions.data(), position_flags.data()};
    int64_t local_first_bad = core::kNoBadIndex;
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t bad = core::mask_row(params, tensors, row, scratch);
      if (bad != core::kNoBadIndex) {
        local_first_bad = bad;
        break;  // rows are in order: this is the chunk's first bad id
      }
    }
    lower_to(first_bad_index, local_first_bad);
  });
  const int64_t bad = first_bad_index.load();
  if (bad != core::kNoBadIndex) {
    raise_span_masking_id_out_of_range(ids, params.vocab_size, bad);
  }

  // Rows' places in the flat SBO table, then each row writes its own.
  std::vector<int64_t> first_target(params.batch);
  int64_t total = 0;
  for (int64_t row = 0; row < params.batch; ++row) {
    first_target[row] = total;
    total += sbo_counts[row];
  }
  at::Tensor sbo_targets = at::empty({total, 5}, ids.options());
  int64_t* sbo_ptr = sbo_targets.mutable_data_ptr<int64_t>();
  at::parallel_for(0, params.batch, grain_rows, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      core::write_sbo_targets(params, tensors, row, first_target[row], sbo_ptr);
    }
  });
  return {prepared.masked_ids, prepared.labels, sbo_targets};
}

}  // namespace

SpanMaskingResult span_masking(
    const at::Tensor& input_ids, const at::Tensor& token_flags,
    const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& word_starts, const at::Tensor& offsets,
    const std::optional<at::Tensor>& unigram_cdf, int64_t seed, int64_t mask_token_id,
    int64_t mask_ratio_numerator, int64_t mask_ratio_denominator,
    c10::IntArrayRef span_word_thresholds, int64_t mask_threshold, int64_t random_threshold,
    int64_t max_span_len, bool sbo_special_boundaries) {
  const SpanMaskingArguments arguments{
      seed, mask_token_id, mask_ratio_numerator, mask_ratio_denominator,
      std::vector<int64_t>(span_word_thresholds.begin(), span_word_thresholds.end()),
      mask_threshold, random_threshold, max_span_len, sbo_special_boundaries};
  PreparedSpanMasking prepared{};
  prepared.params = check_span_masking_inputs(input_ids, token_flags, attention_mask,
                                              word_starts, offsets, unigram_cdf, arguments);
  // Copies and allocations below go to the inputs' device (a no-op guard on the CPU).
  const c10::OptionalDeviceGuard device_guard(input_ids.device());
  prepared.ids = input_ids.contiguous();
  prepared.flags = token_flags.contiguous();
  prepared.mask = attention_mask_as_bool(attention_mask);
  prepared.starts = word_starts.has_value() ? word_starts->contiguous() : at::Tensor();
  prepared.row_offsets = offsets.contiguous();
  prepared.cdf = unigram_cdf.has_value() ? unigram_cdf->contiguous() : at::Tensor();
  prepared.masked_ids = at::empty(prepared.ids.sizes(), prepared.ids.options());
  prepared.labels = at::empty(prepared.ids.sizes(), prepared.ids.options());
  if (prepared.ids.numel() == 0) {
    return {prepared.masked_ids, prepared.labels, at::empty({0, 5}, prepared.ids.options())};
  }

  core::SpanMaskingTensors& tensors = prepared.tensors;
  tensors = core::SpanMaskingTensors{};
  tensors.input_ids = prepared.ids.const_data_ptr<int64_t>();
  tensors.token_flags = prepared.flags.const_data_ptr<uint8_t>();
  tensors.attention_mask = prepared.mask.defined() ? prepared.mask.const_data_ptr<bool>() : nullptr;
  tensors.word_starts = prepared.starts.defined() ? prepared.starts.const_data_ptr<bool>() : nullptr;
  tensors.offsets = prepared.row_offsets.const_data_ptr<int64_t>();
  tensors.unigram_cdf = prepared.cdf.defined() ? prepared.cdf.const_data_ptr<int64_t>() : nullptr;
  tensors.masked_ids = prepared.masked_ids.mutable_data_ptr<int64_t>();
  tensors.labels = prepared.labels.mutable_data_ptr<int64_t>();
#ifdef SBF_WITH_CUDA
  if (prepared.ids.is_cuda()) {
    return span_masking_cuda(prepared);
  }
#endif
  return span_masking_cpu(prepared);
}

at::Tensor sample_span_lengths_cpu(int64_t seed, const at::Tensor& offsets, int64_t count,
                                   c10::IntArrayRef span_word_thresholds) {
  TORCH_CHECK_VALUE(seed >= 0, "sample_span_lengths: seed must be >= 0, got ", seed);
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong,
                   "sample_span_lengths: offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(offsets.dim() == 1, "sample_span_lengths: offsets must be 1-D, got shape ",
                    offsets.sizes());
  TORCH_CHECK_VALUE(offsets.device().is_cpu(),
                    "sample_span_lengths: offsets must be on the CPU, got ", offsets.device());
  TORCH_CHECK_VALUE(count >= 0, "sample_span_lengths: count must be >= 0, got ", count);
  const std::vector<int64_t> thresholds =
      checked_span_word_thresholds(span_word_thresholds, "sample_span_lengths");
  const at::Tensor row_offsets = offsets.contiguous();
  at::Tensor out = at::empty({offsets.size(0), count}, offsets.options());
  const int64_t* offsets_ptr = row_offsets.const_data_ptr<int64_t>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  const int32_t threshold_count = static_cast<int32_t>(thresholds.size());
  const int64_t grain_rows = std::max<int64_t>(1, kGrainTokens / std::max<int64_t>(1, count));
  at::parallel_for(0, offsets.size(0), grain_rows, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t row = row_begin; row < row_end; ++row) {
      core::draw_span_lengths(static_cast<uint64_t>(seed),
                              static_cast<uint64_t>(offsets_ptr[row]), thresholds.data(),
                              threshold_count, count, out_ptr + row * count);
    }
  });
  return out;
}

at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_TYPE(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
                   "philox4x32_10: counter and key must be int64, got ", counter.scalar_type(),
                   " and ", key.scalar_type());
  TORCH_CHECK_VALUE(counter.dim() == 2 && counter.size(1) == 4,
                    "philox4x32_10: counter must be (n, 4), got shape ", counter.sizes());
  TORCH_CHECK_VALUE(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0),
                    "philox4x32_10: key must be (n, 2) with the n of counter, got shape ",
                    key.sizes());
  TORCH_CHECK_VALUE(counter.device().is_cpu() && key.device().is_cpu(),
                    "philox4x32_10: counter and key must be on the CPU, got ", counter.device(),
                    " and ", key.device());
  const at::Tensor counters = counter.contiguous();
  const at::Tensor keys = key.contiguous();
  at::Tensor out = at::empty({counter.size(0), 4}, counter.options());
  const int64_t* counter_ptr = counters.const_data_ptr<int64_t>();
  const int64_t* key_ptr = keys.const_data_ptr<int64_t>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < counter.size(0); ++n) {
    uint32_t words[4];
    for (int w = 0; w < 4; ++w) {
      const int64_t value = counter_ptr[4 * n + w];
      TORCH_CHECK_VALUE(value >= 0 && value <= UINT32_MAX,
                        "philox4x32_10: counter values must be uint32, got ", value);
      words[w] = static_cast<uint32_t>(value);
    }
    for (int w = 0; w < 2; ++w) {
      TORCH_CHECK_VALUE(key_ptr[2 * n + w] >= 0 && key_ptr[2 * n + w] <= UINT32_MAX,
                        "philox4x32_10: key values must be uint32, got ", key_ptr[2 * n + w]);
    }
    const core::Philox4x32Block block =
        core::philox4x32_10(words, static_cast<uint32_t>(key_ptr[2 * n]),
                            static_cast<uint32_t>(key_ptr[2 * n + 1]));
    for (int w = 0; w < 4; ++w) {
      out_ptr[4 * n + w] = block.word[w];
    }
  }
  return out;
}

}  // namespace spanbert_fast
