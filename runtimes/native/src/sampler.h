// The portable sampler (docs/sampling.md), token for token the same as runtimes/sampling.py:
// xoshiro256** seeded through SplitMix64, repetition penalty in float32, greedy, temperature,
// top-k (ties: lower id first), top-p, min-p and one sequential float64 draw.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace edgeloop {

uint64_t splitmix64(uint64_t& state);  // advances `state`, returns the output

class Xoshiro256 {
 public:
  explicit Xoshiro256(uint64_t seed);
  uint64_t next_u64();
  double uniform();  // [0, 1) from the top 53 bits

 private:
  uint64_t s_[4];
};

struct SamplingConfig {
  double temperature = 0.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;
  double min_p = 0.0;
  double repetition_penalty = 1.0;
};

// "" when valid, else one line as GenerationConfig.validate words it.
std::string check_sampling(const SamplingConfig& c);

class Sampler {
 public:
  Sampler(const SamplingConfig& config, uint64_t seed);
  bool greedy() const { return config_.temperature == 0.0 || config_.top_k == 1; }
  uint64_t seed() const { return seed_; }
  // The next token for `logits` [n] given the history (prompt and output). Throws Error
  // (EL_ERR_INVALID_ARGUMENT) on non-finite logits or a history id outside [0, n).
  int32_t sample(const float* logits, size_t n, const int32_t* history, size_t n_history);

 private:
  SamplingConfig config_;
  uint64_t seed_;
  Xoshiro256 rng_;
  std::vector<float> penalized_;
  std::vector<double> z_, p_, running_;
  std::vector<int32_t> ids_, order_;
  std::vector<uint8_t> seen_;
};

uint64_t random_seed();  // 64 bits from std::random_device

}  // namespace edgeloop
