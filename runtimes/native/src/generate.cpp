// The generation loop: runtimes/model.py (Model._request, _fit_context, Request.push / accept,
// run_alone) on one session. The tokens, the per-token depths and the text pieces are those of
// the Python runtime for the same artifact, prompt and options.
#include <algorithm>
#include <chrono>
#include <optional>
#include <set>

#include "error.h"
#include "internal.h"

namespace edgeloop {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

}  // namespace

void generate(el_session& s, std::vector<int32_t> ids, const el_generation_params& p, el_token_callback callback,
              void* user_data, el_generation_result& result) {
  check_generation(p);
  el_model& m = *s.model;
  const Contract& c = m.contract;
  if (ids.empty()) {
    if (!c.bos_token_id) raise(EL_ERR_INVALID_ARGUMENT, "the prompt is empty and the model has no BOS token to start from");
    ids.push_back(static_cast<int32_t>(*c.bos_token_id));
  }
  for (int32_t id : ids)
    if (id < 0 || id >= c.vocab_size)
      raise(EL_ERR_INVALID_ARGUMENT, "prompt ids must be in [0, " + std::to_string(c.vocab_size) + "); got " +
                                         std::to_string(id));
  // _fit_context: the prompt must leave room for one new token, or be cut with `truncate`
  const int64_t limit = c.max_context;
  int32_t dropped = 0;
  if (static_cast<int64_t>(ids.size()) >= limit) {
    if (!p.truncate)
      raise(EL_ERR_CONTEXT_FULL, "the prompt has " + std::to_string(ids.size()) + " tokens but the context holds " +
                                     std::to_string(limit) + "; shorten it or set truncate to keep its last tokens");
    int64_t keep = std::max<int64_t>({limit - p.max_new_tokens, limit / 2, 1});
    keep = std::min<int64_t>(keep, limit - 1);
    dropped = static_cast<int32_t>(ids.size() - keep);
    ids.erase(ids.begin(), ids.end() - keep);
  }
  Sampler sampler(sampling_config(p), p.has_seed ? p.seed : random_seed());
  std::set<int32_t> eos;
  if (!p.ignore_eos)
    for (int64_t e : c.eos_token_ids) eos.insert(static_cast<int32_t>(e));
  std::vector<std::string> stops;
  for (size_t i = 0; i < p.n_stop; ++i) stops.emplace_back(p.stop[i]);
  std::optional<TextStream> stream;
  if (m.tokenizer) stream.emplace(*m.tokenizer, stops);

  // the session's cache: reset, or keep the longest common prefix (ChatSession.send_stream)
  size_t common = 0;
  if (p.reuse_prefix) {
    while (common < s.cached.size() && common < ids.size() && s.cached[common] == ids[common]) ++common;
    common = std::min(common, ids.size() - 1);  // feed at least one token to get logits
  }
  s.tokens.clear();
  s.depths.clear();
  s.text.clear();
  s.sequence->rewind(static_cast<int64_t>(common));
  s.cached.resize(std::min(s.cached.size(), common));

  result = el_generation_result{};
  result.n_prompt_tokens = static_cast<int32_t>(ids.size());
  result.n_dropped_tokens = dropped;
  result.seed = sampler.seed();
  s.cancel.store(false);

  const int cap = s.max_loops;
  const auto t0 = Clock::now();
  Clock::time_point first;
  StepOutput out = s.sequence->step(ids.data() + common, ids.size() - common, false, nullptr, cap);
  s.cached = ids;
  std::vector<int32_t> history = ids;  // prompt + output, for the repetition penalty
  const int64_t vocab = c.vocab_size;
  el_finish_reason reason = EL_FINISH_NONE;
  bool cancelled = false;
  for (;;) {
    const int32_t token = sampler.sample(out.logits.data() + (out.rows - 1) * vocab, static_cast<size_t>(vocab),
                                         history.data(), history.size());
    // Request.push
    const auto now = Clock::now();
    if (s.tokens.empty()) {
      result.prefill_seconds = seconds(t0, now);
      first = now;
    } else {
      result.decode_seconds = seconds(first, now);
    }
    if (p.max_new_tokens == 0) {
      reason = EL_FINISH_LENGTH;
      break;
    }
    if (eos.count(token)) {
      reason = EL_FINISH_EOS;
      break;
    }
    s.tokens.push_back(token);
    s.depths.push_back(out.depth);
    history.push_back(token);
    std::string piece;
    if (stream) {
      piece = stream->push(token);
      s.text += piece;
    }
    if (callback && callback(token, piece.c_str(), piece.size(), user_data) != 0) cancelled = true;
    if (stream && stream->stopped()) {
      reason = EL_FINISH_STOP;
      break;
    }
    if (cancelled || s.cancel.load()) {
      cancelled = true;
      break;
    }
    if (static_cast<int64_t>(s.tokens.size()) >= p.max_new_tokens) {
      reason = EL_FINISH_LENGTH;
      break;
    }
    if (s.sequence->length() >= c.max_context) {
      reason = EL_FINISH_CONTEXT;
      break;
    }
    std::optional<TokenExit> exit;
    if (s.policy.exits()) exit.emplace(s.policy);
    out = s.sequence->step(&token, 1, false, exit ? &*exit : nullptr, cap);
    s.cached.push_back(token);
  }
  // Request.finish
  if (!cancelled && stream && !stream->stopped()) {
    const std::string tail = stream->flush();
    if (stream->stopped()) reason = EL_FINISH_STOP;
    if (!tail.empty()) {
      s.text += tail;
      if (callback && callback(EL_TOKEN_NONE, tail.c_str(), tail.size(), user_data) != 0) cancelled = true;
    }
  }
  if (cancelled) reason = EL_FINISH_CANCELLED;
  result.finish_reason = reason;
  result.n_generated = static_cast<int32_t>(s.tokens.size());
  if (result.n_generated > 1 && result.decode_seconds > 0)
    result.decode_tokens_per_second = (result.n_generated - 1) / result.decode_seconds;
  double sum = 0;
  for (int32_t d : s.depths) sum += d;
  result.mean_loops = s.depths.empty() ? 0.0 : sum / static_cast<double>(s.depths.size());
  s.cached.resize(std::min<size_t>(s.cached.size(), static_cast<size_t>(s.sequence->length())));
  if (cancelled) raise(EL_ERR_CANCELLED, "the generation was cancelled");
}

}  // namespace edgeloop
