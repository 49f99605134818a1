// The portable sampler: a line-by-line port of runtimes/sampling.py (docs/sampling.md). Every sum
// is sequential, left to right, as numpy's cumsum is; exp is the C library's.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "error.h"

namespace edgeloop {

namespace {

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

std::string fmt(double x) {
  char buf[64];
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::snprintf(buf, sizeof(buf), "%.17g", x);
  return buf;
}

// "" or "NAME must be in [LOW, HIGH], got X" (the words of runtimes/sampling.py _number).
std::string in_range(const char* name, double v, double low, double high, bool low_open, bool high_open,
                     const char* low_s, const char* high_s) {
  if (!std::isfinite(v)) return std::string(name) + " must be a number, got " + fmt(v);
  const bool below = low_open ? v <= low : v < low;
  const bool above = high_open ? v >= high : v > high;
  if (below || above)
    return std::string(name) + " must be in " + (low_open ? "(" : "[") + low_s + ", " + high_s +
           (high_open ? ")" : "]") + ", got " + fmt(v);
  return "";
}

}  // namespace

uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

Xoshiro256::Xoshiro256(uint64_t seed) {
  uint64_t state = seed;
  for (auto& s : s_) s = splitmix64(state);
}

uint64_t Xoshiro256::next_u64() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Xoshiro256::uniform() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

uint64_t random_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ static_cast<uint64_t>(rd());
}

std::string check_sampling(const SamplingConfig& c) {
  std::string e;
  if (!(e = in_range("temperature", c.temperature, 0, 100, false, false, "0", "100")).empty()) return e;
  if (c.temperature > 0 && c.temperature < 1e-3)
    return "temperature " + fmt(c.temperature) + " is too small to sample from; use 0 for greedy";
  if (c.top_k < 0 || c.top_k > (int64_t{1} << 31))
    return "top_k must be in [0, 2147483648], got " + std::to_string(c.top_k);
  if (!(e = in_range("top_p", c.top_p, 0, 1, true, false, "0", "1")).empty()) return e;
  if (!(e = in_range("min_p", c.min_p, 0, 1, false, true, "0", "1")).empty()) return e;
  return in_range("repetition_penalty", c.repetition_penalty, 0, 100, true, false, "0", "100");
}

Sampler::Sampler(const SamplingConfig& config, uint64_t seed) : config_(config), seed_(seed), rng_(seed) {}

int32_t Sampler::sample(const float* logits, size_t n, const int32_t* history, size_t n_history) {
  if (n == 0) raise(EL_ERR_INVALID_ARGUMENT, "the logits are empty");
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(logits[i]))
      raise(EL_ERR_INVALID_ARGUMENT, "the model produced non-finite logits (NaN or Inf); its weights or config are "
                                     "broken, or the artifact is damaged");
  const float* x = logits;
  // 1. repetition penalty on every distinct id of the history, in float32
  if (config_.repetition_penalty != 1.0 && n_history) {
    penalized_.assign(logits, logits + n);
    seen_.assign(n, 0);
    const float penalty = static_cast<float>(config_.repetition_penalty);
    for (size_t i = 0; i < n_history; ++i) {
      const int32_t id = history[i];
      if (id < 0 || static_cast<size_t>(id) >= n)
        raise(EL_ERR_INVALID_ARGUMENT, "history token " + std::to_string(id) + " is outside the vocabulary of " +
                                           std::to_string(n));
      if (seen_[id]) continue;
      seen_[id] = 1;
      const float v = penalized_[id];
      penalized_[id] = v > 0 ? v / penalty : v * penalty;
    }
    x = penalized_.data();
  }
  // 2. greedy: the first index of the maximum
  if (greedy()) return static_cast<int32_t>(std::max_element(x, x + n) - x);
  // 3. z = logit / temperature (float64); top-k by (z descending, id ascending)
  z_.resize(n);
  for (size_t i = 0; i < n; ++i) z_[i] = static_cast<double>(x[i]) / config_.temperature;
  ids_.resize(n);
  for (size_t i = 0; i < n; ++i) ids_[i] = static_cast<int32_t>(i);
  if (config_.top_k > 0 && static_cast<size_t>(config_.top_k) < n) {
    const auto by_z = [&](int32_t a, int32_t b) { return z_[a] > z_[b] || (z_[a] == z_[b] && a < b); };
    std::nth_element(ids_.begin(), ids_.begin() + (config_.top_k - 1), ids_.end(), by_z);
    ids_.resize(config_.top_k);
    std::sort(ids_.begin(), ids_.end());
  }
  // 4. p = exp(z - max z) over the kept ids (max over the whole vocabulary)
  const double zmax = *std::max_element(z_.begin(), z_.end());
  p_.resize(ids_.size());
  for (size_t j = 0; j < ids_.size(); ++j) p_[j] = std::exp(z_[ids_[j]] - zmax);
  // 5. top-p: the shortest prefix in (p descending, id ascending) order reaching top_p x total
  if (config_.top_p < 1.0) {
    order_.resize(ids_.size());
    for (size_t j = 0; j < order_.size(); ++j) order_[j] = static_cast<int32_t>(j);
    std::sort(order_.begin(), order_.end(),
              [&](int32_t a, int32_t b) { return p_[a] > p_[b] || (p_[a] == p_[b] && ids_[a] < ids_[b]); });
    running_.resize(order_.size());
    double sum = 0.0;
    for (size_t j = 0; j < order_.size(); ++j) running_[j] = sum += p_[order_[j]];
    const double target = config_.top_p * running_.back();
    const size_t cut = std::min(order_.size(), static_cast<size_t>(std::lower_bound(running_.begin(), running_.end(),
                                                                                    target) - running_.begin()) + 1);
    order_.resize(cut);
    std::sort(order_.begin(), order_.end());  // positions in ids_, i.e. ascending ids
    for (size_t j = 0; j < cut; ++j) {
      ids_[j] = ids_[order_[j]];
      p_[j] = p_[order_[j]];
    }
    ids_.resize(cut);
    p_.resize(cut);
  }
  // 6. min-p: keep p >= min_p (p is 1 at the maximum)
  if (config_.min_p > 0) {
    size_t k = 0;
    for (size_t j = 0; j < ids_.size(); ++j)
      if (p_[j] >= config_.min_p) ids_[k] = ids_[j], p_[k++] = p_[j];
    ids_.resize(k);
    p_.resize(k);
  }
  // 7. the draw: the first id whose running sum exceeds u x total
  running_.resize(p_.size());
  double sum = 0.0;
  for (size_t j = 0; j < p_.size(); ++j) running_[j] = sum += p_[j];
  const double target = rng_.uniform() * running_.back();
  const size_t pick = std::upper_bound(running_.begin(), running_.end(), target) - running_.begin();
  return ids_[std::min(pick, ids_.size() - 1)];
}

}  // namespace edgeloop
