// Early-exit policies: a port of runtimes/exits.py (parse_policy, TokenExit.decide).
#include "exits.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "error.h"

namespace edgeloop {

namespace {

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string g(double x) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", x);
  return buf;
}

bool parse_double(const std::string& text, double& out) {
  const std::string t = trim(text);
  if (t.empty()) return false;
  char* end = nullptr;
  errno = 0;
  out = std::strtod(t.c_str(), &end);
  return end == t.c_str() + t.size();
}

bool parse_int(const std::string& text, long& out) {
  const std::string t = trim(text);
  if (t.empty()) return false;
  char* end = nullptr;
  errno = 0;
  out = std::strtol(t.c_str(), &end, 10);
  return end == t.c_str() + t.size() && errno == 0;
}

}  // namespace

std::string ExitPolicy::str() const {
  if (kind == "none") return "none";
  if (kind == "agreement") return "agreement:" + std::to_string(count);
  if (kind == "depth")
    return low > 0 ? "depth:" + std::to_string(low) + "-" + std::to_string(count) : "depth:" + std::to_string(count);
  if (kind == "speculate") return "speculate:" + std::to_string(draft_depth) + "x" + std::to_string(count);
  return kind + ":" + g(threshold);
}

ExitPolicy parse_exit_policy(const std::string& text, int loops, bool gate, std::optional<double> gate_threshold) {
  const std::string t = trim(text);
  if (t.empty() || lower(t) == "none") return ExitPolicy{};
  const size_t colon = t.find(':');
  const std::string kind = lower(trim(t.substr(0, colon)));
  const std::string arg = colon == std::string::npos ? "" : t.substr(colon + 1);
  static const char* kinds[] = {"none", "confidence", "agreement", "entropy", "kl", "gate", "depth", "speculate"};
  if (std::find_if(std::begin(kinds), std::end(kinds), [&](const char* k) { return kind == k; }) == std::end(kinds))
    raise(EL_ERR_INVALID_ARGUMENT, "unknown exit policy '" + kind + "'; choose one of none, confidence, agreement, "
                                   "entropy, kl, gate, depth, speculate (e.g. confidence:0.9, agreement:1, gate:0.6)");
  const std::string quoted = "exit policy '" + text + "'";
  const auto number = [&](double low, double high, bool low_open) {
    double v;
    if (!parse_double(arg, v))
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": " + kind + " needs a number, e.g. " + kind + ":" + (high < 9 ? g(high) : "1"));
    if (!std::isfinite(v) || (low_open ? v <= low : v < low) || v > high)
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": the threshold must be in " + (low_open ? "(" : "[") + g(low) + ", " +
                                         g(high) + "]");
    return v;
  };
  const auto integer = [&](long low, long high, const char* what) {
    long v;
    if (!parse_int(arg, v)) raise(EL_ERR_INVALID_ARGUMENT, quoted + ": " + what + " must be an integer");
    if (v < low || v > high)
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": " + what + " must be in [" + std::to_string(low) + ", " +
                                         std::to_string(high) + "]");
    return static_cast<int>(v);
  };
  ExitPolicy p;
  p.kind = kind;
  if (kind == "none") return ExitPolicy{};
  if (kind == "confidence") {
    p.threshold = number(0.0, 1.0, true);
  } else if (kind == "entropy" || kind == "kl") {
    p.threshold = number(0.0, 100.0, false);
  } else if (kind == "agreement") {
    p.count = trim(arg).empty() ? 1 : integer(1, std::max(1, loops - 1), "the number of boundaries");
  } else if (kind == "depth" && arg.find('-') != std::string::npos) {
    const size_t dash = arg.find('-');
    long lo, hi;
    if (!parse_int(arg.substr(0, dash), lo) || !parse_int(arg.substr(dash + 1), hi))
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": depth needs D or LO-HI, e.g. depth:1-3");
    if (!(1 <= lo && lo < hi && hi <= loops))
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": the depths must satisfy 1 <= LO < HI <= " + std::to_string(loops));
    p.low = static_cast<int>(lo);
    p.count = static_cast<int>(hi);
  } else if (kind == "depth") {
    p.count = integer(1, loops, "the depth");
  } else if (kind == "gate") {
    if (!gate)
      raise(EL_ERR_INVALID_ARGUMENT, "exit policy gate needs a model with a learned exit gate (an Ouro checkpoint, "
                                     "or one uptrained with --exit-gate)");
    p.threshold = !trim(arg).empty() ? number(0.0, 1.0, true) : gate_threshold.value_or(1.0);
  } else {  // speculate:DxN
    const std::string a = lower(arg);
    const size_t x = a.find('x');
    long d, n;
    if (x == std::string::npos || !parse_int(a.substr(0, x), d) || !parse_int(a.substr(x + 1), n))
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": speculate needs DEPTHxTOKENS, e.g. speculate:1x4");
    if (d < 1 || d >= loops || n < 1 || n > 16)
      raise(EL_ERR_INVALID_ARGUMENT, quoted + ": the draft depth must be in [1, " + std::to_string(loops - 1) +
                                         "] and the draft length in [1, 16]");
    p.count = static_cast<int>(n);
    p.draft_depth = static_cast<int>(d);
  }
  return p;
}

int scattered_depth(uint64_t token, int low, int high) {
  uint64_t z = token + 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return low + static_cast<int>(z % static_cast<uint64_t>(high - low + 1));
}

double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double res = 0.0;
    for (size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

void TokenExit::log_softmax(const float* logits, size_t n) {
  // z = logits (float64) - max; lp = z - log(sum(exp(z)))
  lp_.resize(n);
  tmp_.resize(n);
  double m = -INFINITY;
  for (size_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(logits[i]));
  for (size_t i = 0; i < n; ++i) lp_[i] = static_cast<double>(logits[i]) - m;
  for (size_t i = 0; i < n; ++i) tmp_[i] = std::exp(lp_[i]);
  const double lse = std::log(pairwise_sum(tmp_.data(), n));
  for (size_t i = 0; i < n; ++i) lp_[i] -= lse;
}

bool TokenExit::decide(int passes, const float* logits, size_t n, std::optional<double> gate) {
  const ExitPolicy& p = policy_;
  if (p.kind == "depth" && p.low > 0) {
    if (argmax_ < 0) {  // the first boundary fixes this token's depth (numpy's argmax: the first maximum)
      const long top = static_cast<long>(std::max_element(logits, logits + n) - logits);
      argmax_ = scattered_depth(static_cast<uint64_t>(top), p.low, p.count);
    }
    return passes >= argmax_;
  }
  if (p.kind == "depth") return passes >= p.count;
  if (p.kind == "gate") {
    const double lam = gate.value_or(0.0);
    cdf_ += lam * survive_;
    survive_ *= 1.0 - lam;
    return cdf_ >= p.threshold;
  }
  if (p.kind == "confidence") {
    log_softmax(logits, n);
    return std::exp(*std::max_element(lp_.begin(), lp_.end())) >= p.threshold;
  }
  if (p.kind == "entropy") {
    log_softmax(logits, n);
    for (size_t i = 0; i < n; ++i) tmp_[i] = std::exp(lp_[i]) * lp_[i];
    return -pairwise_sum(tmp_.data(), n) <= p.threshold;
  }
  if (p.kind == "kl") {
    log_softmax(logits, n);
    const bool had = has_previous_;
    double kl = 0.0;
    if (had) {
      for (size_t i = 0; i < n; ++i) tmp_[i] = std::exp(lp_[i]) * (lp_[i] - previous_[i]);
      kl = pairwise_sum(tmp_.data(), n);
    }
    previous_ = lp_;
    has_previous_ = true;
    return had && kl <= p.threshold;
  }
  if (p.kind == "agreement") {
    const long top = static_cast<long>(std::max_element(logits, logits + n) - logits);
    unchanged_ = top == argmax_ ? unchanged_ + 1 : 0;
    argmax_ = top;
    return unchanged_ >= p.count;
  }
  return false;
}

}  // namespace edgeloop
