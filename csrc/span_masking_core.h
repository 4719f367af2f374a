// The span-masking sampler's core, shared by the host (CPU ops) and the device (CUDA
// kernels) so that both compute exactly the same thing.
//
// Plain C++17: no torch and no CUDA runtime headers, so a .cu file that includes it
// compiles with `nvcc -c` alone (CI has nvcc but no CUDA build of torch).
//
// Bit-identity between host and device rests on two rules kept everywhere below:
//   * every random decision uses integer arithmetic only (uint32 draws compared with
//     integer thresholds that the host computed once; no float is ever rounded here);
//   * one sequence = one counter-based random stream, Philox4x32-10 keyed by the seed with
//     the sequence's offset in the counter, consumed in one fixed order. Nothing depends
//     on the batch, the row index, the padded width or the thread that runs the row.
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

// --------------------------------------------------------------------------- Philox4x32-10

// One block of the counter-based generator Philox4x32-10 (Salmon et al., SC'11, the
// Random123 constants): 4 x 32 random bits from a 128-bit counter and a 64-bit key.
// Checked against Random123's known-answer vectors in tests/test_masking.py.
struct Philox4x32Block {
  uint32_t word[4];
};

constexpr uint32_t kPhiloxMultiplier0 = 0xD2511F53u;
constexpr uint32_t kPhiloxMultiplier1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

SBF_HOST_DEVICE inline Philox4x32Block philox4x32_10(const uint32_t counter[4],
                                                      uint32_t key0, uint32_t key1) {
  uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      key0 += kPhiloxWeyl0;
      key1 += kPhiloxWeyl1;
    }
    const uint64_t product0 = static_cast<uint64_t>(kPhiloxMultiplier0) * c0;
    const uint64_t product1 = static_cast<uint64_t>(kPhiloxMultiplier1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(product0 >> 32);
    const uint32_t lo0 = static_cast<uint32_t>(product0);
    const uint32_t hi1 = static_cast<uint32_t>(product1 >> 32);
    const uint32_t lo1 = static_cast<uint32_t>(product1);
    c0 = hi1 ^ c1 ^ key0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ key1;
    c3 = lo0;
  }
  return Philox4x32Block{{c0, c1, c2, c3}};
}

// The random stream of one sequence: key = seed, counter = (block index as 64 bits,
// offset as 64 bits). Draws are consumed four per Philox block, in order.
class RandomStream {
 public:
  SBF_HOST_DEVICE RandomStream(uint64_t seed, uint64_t offset)
      : key0_(static_cast<uint32_t>(seed)),
        key1_(static_cast<uint32_t>(seed >> 32)),
        counter_{0u, 0u, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
        block_{{0u, 0u, 0u, 0u}},
        next_word_(4) {}

  // The next 32 uniform random bits.
  SBF_HOST_DEVICE uint32_t next_u32() {
    if (next_word_ == 4) {
      block_ = philox4x32_10(counter_, key0_, key1_);
      if (++counter_[0] == 0u) {
        ++counter_[1];
      }
      next_word_ = 0;
    }
    return block_.word[next_word_++];
  }

  // Uniform integer in [0, n), n >= 1, without bias: Lemire's multiply-high with
  // rejection (Lemire, "Fast random integer generation in an interval", 2019). A draw is
  // rejected with probability < n / 2^32 (7e-6 for a 28996-word vocabulary).
  SBF_HOST_DEVICE uint32_t uniform_below(uint32_t n) {
    uint64_t product = static_cast<uint64_t>(next_u32()) * n;
    uint32_t low = static_cast<uint32_t>(product);
    if (low < n) {
      const uint32_t threshold = (0u - n) % n;  // 2^32 mod n
      while (low < threshold) {
        product = static_cast<uint64_t>(next_u32()) * n;
        low = static_cast<uint32_t>(product);
      }
    }
    return static_cast<uint32_t>(product >> 32);
  }

 private:
  uint32_t key0_;
  uint32_t key1_;
  uint32_t counter_[4];
  Philox4x32Block block_;
  int next_word_;
};

// --------------------------------------------------------------------------- sampler

// Bits of the per-vocabulary-entry table `token_flags` (uint8, one entry per id).
constexpr uint8_t kTokenIsContinuation = 1;  // a `##` WordPiece continuation
constexpr uint8_t kTokenIsSpecial = 2;       // never masked ([CLS], [SEP], [PAD], ...)

// Most words a span can be drawn with: the length of the threshold table below, fixed so
// that the parameters travel to the CUDA kernel by value.
constexpr int kMaxSpanWords = 64;

// Probabilities as integers: a threshold t in [0, 2^32] stands for t / 2^32, and a uint32
// draw u "succeeds" when u < t. The host computes every threshold once.
constexpr int64_t kProbabilityOne = int64_t{1} << 32;

// A span's length in words: 1 + the number of thresholds that `u` reaches, where
// thresholds[k] = round(2^32 * P(length <= k + 1)) is non-decreasing (the clipped,
// renormalised geometric distribution's CDF; the last entry, 1, is implicit). `count` =
// max_span_words - 1 entries.
SBF_HOST_DEVICE inline int32_t span_words_from_draw(uint32_t u, const int64_t* thresholds,
                                                    int32_t count) {
  int32_t words = 1;
  while (words - 1 < count && static_cast<int64_t>(u) >= thresholds[words - 1]) {
    ++words;
  }
  return words;
}

// The one function that draws a span's length, for the sampler and the test-only op
// spanbert_fast::sample_span_lengths alike.
SBF_HOST_DEVICE inline int32_t draw_span_words(RandomStream& stream, const int64_t* thresholds,
                                               int32_t count) {
  return span_words_from_draw(stream.next_u32(), thresholds, count);
}

// A token drawn from a unigram distribution given as an integer CDF: cdf[k] =
// round(2^32 * P(id <= k)), non-decreasing, cdf[vocab_size - 1] = 2^32. Returns the first
// id whose cdf exceeds u (ids of probability 0 are never drawn).
SBF_HOST_DEVICE inline int64_t unigram_token_from_draw(uint32_t u, const int64_t* cdf,
                                                       int64_t vocab_size) {
  int64_t low = 0;
  int64_t high = vocab_size - 1;  // cdf[high] = 2^32 > u
  while (low < high) {
    const int64_t middle = low + (high - low) / 2;
    if (cdf[middle] > static_cast<int64_t>(u)) {
      high = middle;
    } else {
      low = middle + 1;
    }
  }
  return low;
}

// Scalar parameters of the sampler (no pointers: passed by value to the CUDA kernel).
struct SpanMaskingParams {
  int64_t batch;
  int64_t seq;
  int64_t vocab_size;  // entries of token_flags (and of unigram_cdf when given)
  int64_t mask_token_id;
  uint64_t seed;
  // Budget per sequence = ceil(maskable * numerator / denominator), exact in integers.
  int64_t mask_ratio_numerator;
  int64_t mask_ratio_denominator;
  // Span lengths in words: span_words_from_draw over max_span_words - 1 thresholds.
  int32_t span_word_threshold_count;
  int64_t span_word_thresholds[kMaxSpanWords];
  // 80/10/10 per merged span, one draw u: u < mask_threshold -> all [MASK];
  // u < random_threshold -> all random tokens; else all unchanged (cumulative thresholds).
  int64_t mask_threshold;
  int64_t random_threshold;
  // SBO targets only for rel_pos < max_span_len (the SBO position table's size).
  int64_t max_span_len;
  // Which positions may be a span's SBO boundary: false (the original SpanBERT) = maskable
  // tokens only (real and not special, so never [CLS]/[SEP]); true = any real token.
  bool sbo_special_boundaries;
};

// Tensors of the sampler, all contiguous (batch, seq) unless said otherwise.
struct SpanMaskingTensors {
  const int64_t* input_ids;
  const uint8_t* token_flags;     // (vocab_size,) kTokenIs* bits
  const bool* attention_mask;     // real tokens, or nullptr (all real)
  const bool* word_starts;        // explicit word starts, or nullptr (from token_flags)
  const int64_t* offsets;         // (batch,) the stream of each sequence
  const int64_t* unigram_cdf;     // (vocab_size,) integer CDF, or nullptr (uniform)
  int64_t* masked_ids;            // out: input_ids with the masked spans replaced
  int64_t* labels;                // out: original id where masked, -100 elsewhere
  int64_t* sbo_counts;            // (batch,) out: SBO targets of each row
};

// Scratch of one row, `seq` entries each (the CPU op keeps one per thread, the CUDA
// kernel one per row in a workspace).
struct RowScratch {
  int32_t* maskable_positions;  // positions that may be masked
  uint8_t* position_flags;      // kPosition* bits
};

constexpr int64_t kIgnoreLabel = -100;

// Whether position `i` of row `row` can be an SBO boundary: a real token and, unless
// params.sbo_special_boundaries, not a special one. Reads token_flags only for rows whose
// ids mask_row found in range (it runs after pass 1 of the row).
SBF_HOST_DEVICE inline bool is_sbo_boundary(const SpanMaskingParams& params,
                                            const SpanMaskingTensors& tensors, int64_t row,
                                            int64_t i) {
  const int64_t flat = row * params.seq + i;
  if (tensors.attention_mask != nullptr && !tensors.attention_mask[flat]) {
    return false;
  }
  return params.sbo_special_boundaries ||
         (tensors.token_flags[tensors.input_ids[flat]] & kTokenIsSpecial) == 0;
}

// SBO targets of the merged span [start, end) of row `row`: its first max_span_len tokens
// when both outer neighbours, start - 1 and end, are SBO boundaries (is_sbo_boundary),
// else none. The one rule that mask_row (counting) and write_sbo_targets (writing) share.
SBF_HOST_DEVICE inline int64_t sbo_target_count(const SpanMaskingParams& params,
                                                const SpanMaskingTensors& tensors, int64_t row,
                                                int64_t start, int64_t end) {
  if (start < 1 || end >= params.seq) {
    return 0;
  }
  if (!is_sbo_boundary(params, tensors, row, start - 1) ||
      !is_sbo_boundary(params, tensors, row, end)) {
    return 0;
  }
  return end - start < params.max_span_len ? end - start : params.max_span_len;
}

// Bits of `position_flags` (per position of a row).
constexpr uint8_t kPositionIsMaskable = 1;   // real (attention mask on), not a special token
constexpr uint8_t kPositionStartsWord = 2;   // maskable and the first piece of a word
constexpr uint8_t kPositionIsMasked = 4;

// Masks row `row` of the batch; writes every output position of the row.
//
// Returns kNoBadIndex, or the flat index (row * seq + position) of the row's first id
// outside [0, vocab_size); the row's outputs are then incomplete and the caller raises.
//
// The algorithm (DESIGN.md, "What SpanBERT is"):
//   budget = ceil(ratio * maskable tokens). Until `budget` tokens are masked: draw a span
//   length in words; draw an anchor uniformly among the maskable positions not masked yet
//   (rejection over the maskable ones); move it left to the start of its word; mask
//   forward over that many words, stopping at a special token, padding or the row's end,
//   or as soon as the budget is met. A word starts at a piece that is not a continuation,
//   at position 0 and after any non-maskable position (a special token ends a word). Every
//   iteration masks at least the anchor's word start, so the loop ends with exactly
//   `budget` masked tokens. Then each maximal run of masked positions (overlapping and
//   adjacent spans merged) draws one of [MASK] / random / unchanged, and gets SBO targets
//   when both outer neighbours are SBO boundaries (rel_pos < max_span_len only).
//
// Draw order of the stream (part of the contract, for bit-identity): per span, the length
// then the anchor (with its rejections); then per merged span, left to right, the
// 80/10/10 draw then, for a random span, one token per position.
SBF_HOST_DEVICE inline int64_t mask_row(const SpanMaskingParams& params,
                                        const SpanMaskingTensors& tensors, int64_t row,
                                        RowScratch scratch) {
  const int64_t seq = params.seq;
  const int64_t base = row * seq;
  const int64_t* ids = tensors.input_ids + base;
  int64_t* masked_ids = tensors.masked_ids + base;
  int64_t* labels = tensors.labels + base;
  int32_t* maskable_positions = scratch.maskable_positions;
  uint8_t* flags = scratch.position_flags;

  // Pass 1: copy, classify every position, list the maskable ones.
  tensors.sbo_counts[row] = 0;
  int64_t maskable_count = 0;
  for (int64_t i = 0; i < seq; ++i) {
    const int64_t token_id = ids[i];
    if (!token_id_in_range(token_id, params.vocab_size)) {
      return base + i;
    }
    masked_ids[i] = token_id;
    labels[i] = kIgnoreLabel;
    const uint8_t token = tensors.token_flags[token_id];
    const bool real = tensors.attention_mask == nullptr || tensors.attention_mask[base + i];
    uint8_t position = 0;
    if (real && (token & kTokenIsSpecial) == 0) {
      position |= kPositionIsMaskable;
      const bool piece_starts_word = tensors.word_starts != nullptr
                                         ? tensors.word_starts[base + i]
                                         : (token & kTokenIsContinuation) == 0;
      const bool after_word_break = i == 0 || (flags[i - 1] & kPositionIsMaskable) == 0;
      if (piece_starts_word || after_word_break) {
        position |= kPositionStartsWord;
      }
      maskable_positions[maskable_count++] = static_cast<int32_t>(i);
    }
    flags[i] = position;
  }

  // Pass 2: draw spans until the budget is met.
  const int64_t budget =
      (maskable_count * params.mask_ratio_numerator + params.mask_ratio_denominator - 1) /
      params.mask_ratio_denominator;
  RandomStream stream(params.seed, static_cast<uint64_t>(tensors.offsets[row]));
  int64_t masked = 0;
  while (masked < budget) {
    int32_t words_left = draw_span_words(stream, params.span_word_thresholds,
                                         params.span_word_threshold_count);
    int64_t anchor;
    do {
      anchor = maskable_positions[stream.uniform_below(static_cast<uint32_t>(maskable_count))];
    } while ((flags[anchor] & kPositionIsMasked) != 0);
    int64_t i = anchor;
    while ((flags[i] & kPositionStartsWord) == 0) {
      --i;  // ends: position 0 and the piece after a non-maskable one start words
    }
    while (true) {
      if ((flags[i] & kPositionIsMasked) == 0) {
        flags[i] |= kPositionIsMasked;
        labels[i] = ids[i];
        if (++masked == budget) {
          break;
        }
      }
      ++i;
      if (i >= seq || (flags[i] & kPositionIsMaskable) == 0) {
        break;
      }
      if ((flags[i] & kPositionStartsWord) != 0 && --words_left == 0) {
        break;
      }
    }
  }
  if (masked == 0) {
    return kNoBadIndex;
  }

  // Pass 3: per merged span (maximal run of masked positions), 80/10/10 and SBO targets.
  const uint32_t vocab = static_cast<uint32_t>(params.vocab_size);
  int64_t i = 0;
  while (i < seq) {
    if ((flags[i] & kPositionIsMasked) == 0) {
      ++i;
      continue;
    }
    const int64_t start = i;
    while (i < seq && (flags[i] & kPositionIsMasked) != 0) {
      ++i;
    }
    const int64_t end = i;  // exclusive: the run is [start, end)
    const int64_t mode = static_cast<int64_t>(stream.next_u32());
    if (mode < params.mask_threshold) {
      for (int64_t j = start; j < end; ++j) {
        masked_ids[j] = params.mask_token_id;
      }
    } else if (mode < params.random_threshold) {
      for (int64_t j = start; j < end; ++j) {
        masked_ids[j] = tensors.unigram_cdf != nullptr
                            ? unigram_token_from_draw(stream.next_u32(), tensors.unigram_cdf,
                                                      params.vocab_size)
                            : static_cast<int64_t>(stream.uniform_below(vocab));
      }
    }
    tensors.sbo_counts[row] += sbo_target_count(params, tensors, row, start, end);
  }
  return kNoBadIndex;
}

// Writes row `row`'s SBO targets (after mask_row: its merged spans are the runs of
// labels != -100) as rows first, first + 1, ... of the (N, 5) int64 table `sbo_targets`:
// (row, left, right, rel_pos, label), by position. Runs once every row's count is known.
SBF_HOST_DEVICE inline void write_sbo_targets(const SpanMaskingParams& params,
                                              const SpanMaskingTensors& tensors, int64_t row,
                                              int64_t first, int64_t* sbo_targets) {
  const int64_t seq = params.seq;
  const int64_t* labels = tensors.labels + row * seq;
  int64_t* out = sbo_targets + first * 5;
  int64_t i = 0;
  while (i < seq) {
    if (labels[i] == kIgnoreLabel) {
      ++i;
      continue;
    }
    const int64_t start = i;
    while (i < seq && labels[i] != kIgnoreLabel) {
      ++i;
    }
    const int64_t count = sbo_target_count(params, tensors, row, start, i);
    for (int64_t rel_pos = 0; rel_pos < count; ++rel_pos) {
      out[0] = row;
      out[1] = start - 1;
      out[2] = i;
      out[3] = rel_pos;
      out[4] = labels[start + rel_pos];
      out += 5;
    }
  }
}

// Draws `count` span lengths (in words) from the stream of (seed, offset): the test-only
// op spanbert_fast::sample_span_lengths, which shows the distribution before merging.
SBF_HOST_DEVICE inline void draw_span_lengths(uint64_t seed, uint64_t offset,
                                              const int64_t* thresholds,
                                              int32_t threshold_count, int64_t count,
                                              int64_t* out) {
  RandomStream stream(seed, offset);
  for (int64_t k = 0; k < count; ++k) {
    out[k] = draw_span_words(stream, thresholds, threshold_count);
  }
}

}  // namespace core
}  // namespace spanbert_fast
