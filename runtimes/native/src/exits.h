// Early exit at loop boundaries (runtimes/exits.py): the policies and the per-token decision.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace edgeloop {

struct ExitPolicy {
  std::string kind = "none";  // none confidence agreement entropy kl gate depth speculate
  double threshold = 0.0;     // confidence TAU, entropy / kl MAX, gate threshold
  int count = 1;              // agreement: boundaries without change; depth: passes; speculate: drafts
  int draft_depth = 0;        // speculate
  int low = 0;                // depth:LO-HI: the shallowest forced depth (count is the deepest)
  bool exits() const { return kind != "none" && kind != "speculate"; }
  std::string str() const;  // "confidence:0.9", ... (Python's str(policy))
};

// "confidence:0.9" -> ExitPolicy; throws Error(EL_ERR_INVALID_ARGUMENT) with parse_policy's words.
ExitPolicy parse_exit_policy(const std::string& text, int loops, bool gate, std::optional<double> gate_threshold);

// depth:LO-HI: a depth in [low, high] from a SplitMix64 finaliser of the token id (scattered_depth
// in runtimes/exits.py, bit for bit).
int scattered_depth(uint64_t token, int low, int high);

// numpy's pairwise float64 sum (what np.sum gives for a contiguous 1-D array), so that the
// decisions below see the same numbers as the Python runtime.
double pairwise_sum(const double* a, size_t n);

// The decision memory of one token through the loop (TokenExit in runtimes/exits.py).
class TokenExit {
 public:
  explicit TokenExit(const ExitPolicy& policy) : policy_(policy) {}
  const ExitPolicy& policy() const { return policy_; }
  // After `passes` passes (< loops): leave the loop now? `gate` is the exit gate's probability.
  bool decide(int passes, const float* logits, size_t n, std::optional<double> gate);
  // Does the next decision read the logits? Forced depths do not, once a scattered depth is fixed.
  bool needs_logits() const { return policy_.kind != "depth" || (policy_.low > 0 && argmax_ < 0); }

 private:
  void log_softmax(const float* logits, size_t n);
  ExitPolicy policy_;
  std::vector<double> lp_, previous_, tmp_;
  bool has_previous_ = false;
  long argmax_ = -1;
  int unchanged_ = 0;
  double survive_ = 1.0, cdf_ = 0.0;
};

}  // namespace edgeloop
