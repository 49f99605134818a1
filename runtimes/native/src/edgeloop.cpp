// The C API (include/edgeloop.h): argument checks, handles, and the boundary that turns every
// C++ exception into an el_status plus a thread-local message. Nothing here prints or exits.
#include "edgeloop.h"

#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <new>
#include <optional>
#include <set>

#include "error.h"
#include "internal.h"

#ifndef EDGELOOP_VERSION
#define EDGELOOP_VERSION "0.0.0"
#endif

using namespace edgeloop;

namespace {

thread_local std::string g_last_error;

struct LogSink {
  std::mutex mutex;
  el_log_callback callback = nullptr;
  void* user_data = nullptr;
};

LogSink& sink() {
  static LogSink s;
  return s;
}

el_status fail(el_status status, const std::string& message) {
  try {
    g_last_error = message;
  } catch (...) {  // no memory for the message itself
  }
  return status;
}

// Runs `f`, mapping exceptions to statuses. Never lets one escape into C.
template <typename F>
el_status guard(F&& f) {
  try {
    f();
    return EL_OK;
  } catch (const Error& e) {
    return fail(e.status, e.what());
  } catch (const TokenizerError& e) {
    return fail(EL_ERR_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return fail(EL_ERR_NO_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return fail(EL_ERR_INTERNAL, std::string("internal error: ") + e.what());
  } catch (...) {
    return fail(EL_ERR_INTERNAL, "internal error: unknown exception");
  }
}

void need(bool ok, const char* message) {
  if (!ok) raise(EL_ERR_INVALID_ARGUMENT, message);
}

// snprintf-style copy: returns the full length, writes at most len bytes with a NUL.
int32_t copy_out(const std::string& s, char* buf, size_t len) {
  if (buf && len) {
    const size_t n = std::min(s.size(), len - 1);
    std::memcpy(buf, s.data(), n);
    buf[n] = '\0';
  }
  return static_cast<int32_t>(std::min<size_t>(s.size(), INT32_MAX));
}

const Tokenizer& tokenizer_of(const el_model* model) {
  need(model != nullptr, "model is NULL");
  if (!model->tokenizer)
    raise(EL_ERR_INVALID_ARGUMENT, model->path + " has no tokenizer; text needs one (token ids work without)");
  return *model->tokenizer;
}

double since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

std::string fmt_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f s", s);
  return buf;
}

}  // namespace

namespace edgeloop {

void log(el_log_level level, const std::string& message) {
  el_log_callback callback;
  void* user_data;
  {
    std::lock_guard<std::mutex> lock(sink().mutex);
    callback = sink().callback;
    user_data = sink().user_data;
  }
  if (callback) callback(level, message.c_str(), user_data);
}

SamplingConfig sampling_config(const el_generation_params& p) {
  SamplingConfig c;
  c.temperature = p.temperature;
  c.top_k = p.top_k;
  c.top_p = p.top_p;
  c.min_p = p.min_p;
  c.repetition_penalty = p.repetition_penalty;
  return c;
}

void check_generation(const el_generation_params& p) {
  if (p.max_new_tokens < 0 || p.max_new_tokens > (1 << 20))
    raise(EL_ERR_INVALID_ARGUMENT, "max_new_tokens must be in [0, 1048576], got " + std::to_string(p.max_new_tokens));
  const std::string bad = check_sampling(sampling_config(p));
  if (!bad.empty()) raise(EL_ERR_INVALID_ARGUMENT, bad);
  if (p.n_stop && !p.stop) raise(EL_ERR_INVALID_ARGUMENT, "stop is NULL but n_stop is " + std::to_string(p.n_stop));
  for (size_t i = 0; i < p.n_stop; ++i)
    if (!p.stop[i]) raise(EL_ERR_INVALID_ARGUMENT, "stop string " + std::to_string(i) + " is NULL");
}

}  // namespace edgeloop

// ---------------------------------------------------------------------------------------------
// library

const char* el_version(void) {
  static const std::string v = std::string(EDGELOOP_VERSION) + " (artifact format " + std::to_string(kVersion) + ")";
  return v.c_str();
}

const char* el_status_name(el_status status) {
  switch (status) {
    case EL_OK: return "EL_OK";
    case EL_ERR_INVALID_ARGUMENT: return "EL_ERR_INVALID_ARGUMENT";
    case EL_ERR_IO: return "EL_ERR_IO";
    case EL_ERR_CORRUPT_ARTIFACT: return "EL_ERR_CORRUPT_ARTIFACT";
    case EL_ERR_CHECKSUM: return "EL_ERR_CHECKSUM";
    case EL_ERR_VERSION: return "EL_ERR_VERSION";
    case EL_ERR_CONTEXT_FULL: return "EL_ERR_CONTEXT_FULL";
    case EL_ERR_TVM: return "EL_ERR_TVM";
    case EL_ERR_CANCELLED: return "EL_ERR_CANCELLED";
    case EL_ERR_NO_MEMORY: return "EL_ERR_NO_MEMORY";
    case EL_ERR_UNSUPPORTED: return "EL_ERR_UNSUPPORTED";
    case EL_ERR_INTERNAL: return "EL_ERR_INTERNAL";
  }
  return "EL_ERR_UNKNOWN";
}

const char* el_finish_reason_name(el_finish_reason reason) {
  switch (reason) {
    case EL_FINISH_EOS: return "eos";
    case EL_FINISH_LENGTH: return "length";
    case EL_FINISH_STOP: return "stop";
    case EL_FINISH_CONTEXT: return "context";
    case EL_FINISH_CANCELLED: return "cancelled";
    case EL_FINISH_NONE: break;
  }
  return "";
}

const char* el_last_error(void) { return g_last_error.c_str(); }

void el_set_log_callback(el_log_callback callback, void* user_data) {
  std::lock_guard<std::mutex> lock(sink().mutex);
  sink().callback = callback;
  sink().user_data = user_data;
}

// ---------------------------------------------------------------------------------------------
// model

el_model_params el_model_default_params(void) {
  el_model_params p;
  p.n_threads = 0;
  p.verify_checksums = true;
  p.library_path = nullptr;
  return p;
}

el_status el_model_load(const char* path, el_model_params params, el_model** out_model) {
  if (out_model) *out_model = nullptr;
  return guard([&] {
    need(path != nullptr && *path, "path is NULL or empty");
    need(out_model != nullptr, "out_model is NULL");
    need(params.n_threads >= 0, "n_threads must be >= 0");
    const auto t0 = std::chrono::steady_clock::now();
    auto model = std::make_unique<el_model>();
    model->path = path;
    while (model->path.size() > 1 && model->path.back() == '/') model->path.pop_back();
    const std::string& dir = model->path;
    model->contract = load_contract(dir);
    const Contract& c = model->contract;
    std::string library = dir + "/" + c.tvm_library;
    std::set<std::string> skip;
    if (params.library_path) {
      library = params.library_path;
      skip.insert(c.tvm_library);
    } else if (c.tvm_library.size() > 4 && c.tvm_library.compare(c.tvm_library.size() - 4, 4, ".tar") == 0) {
      raise(EL_ERR_UNSUPPORTED, c.tvm_library + " of " + dir + " is an object archive for --target " + c.target +
                                    ": link it into a shared library for this platform and pass it as "
                                    "el_model_params.library_path (docs/native.md)");
    }
    if (params.verify_checksums)
      verify_files(dir, c, skip);
    else
      log(EL_LOG_WARN, "the checksums of " + dir + " are not verified (verify_checksums is false)");
    if (params.library_path) log(EL_LOG_INFO, "model library: " + library + " (in place of " + c.tvm_library + ")");
    const double verified = since(t0);
    if (c.tokenizer_file) {
      try {
        model->tokenizer = Tokenizer::from_file(dir + "/" + *c.tokenizer_file);
      } catch (const TokenizerError& e) {
        raise(EL_ERR_CORRUPT_ARTIFACT, std::string("cannot load the tokenizer: ") + e.what());
      }
    }
    model->tvm = std::make_unique<TvmModel>(c, dir, library, params.n_threads);
    log(EL_LOG_INFO, "loaded " + dir + " in " + fmt_seconds(since(t0)) + " (checks " + fmt_seconds(verified) + ")");
    *out_model = model.release();
  });
}

void el_model_free(el_model* model) { delete model; }

int32_t el_model_n_vocab(const el_model* model) { return model ? static_cast<int32_t>(model->contract.vocab_size) : 0; }
int32_t el_model_n_ctx(const el_model* model) { return model ? static_cast<int32_t>(model->contract.max_context) : 0; }
int32_t el_model_n_loops(const el_model* model) { return model ? static_cast<int32_t>(model->contract.loops) : 0; }
bool el_model_has_host_loop(const el_model* model) { return model && model->tvm->host_loop(); }
bool el_model_has_tokenizer(const el_model* model) { return model && model->tokenizer != nullptr; }

el_token el_model_bos(const el_model* model) {
  return model && model->contract.bos_token_id ? static_cast<el_token>(*model->contract.bos_token_id) : EL_TOKEN_NONE;
}

bool el_model_is_eos(const el_model* model, el_token token) {
  if (!model) return false;
  for (int64_t e : model->contract.eos_token_ids)
    if (e == token) return true;
  return false;
}

int32_t el_model_exit_policy(const el_model* model, char* buf, size_t len) {
  if (!model) return -fail(EL_ERR_INVALID_ARGUMENT, "model is NULL");
  return copy_out(model->contract.exit_policy, buf, len);
}

// ---------------------------------------------------------------------------------------------
// tokens

int32_t el_tokenize(const el_model* model, const char* text, size_t text_len, bool add_special, el_token* tokens,
                    int32_t n_tokens_max) {
  int32_t count = 0;
  const el_status st = guard([&] {
    const Tokenizer& tok = tokenizer_of(model);
    need(text != nullptr || text_len == 0, "text is NULL");
    need(n_tokens_max >= 0 && (tokens != nullptr || n_tokens_max == 0), "tokens is NULL or n_tokens_max < 0");
    std::vector<int32_t> ids = tok.encode(std::string_view(text ? text : "", text_len));
    if (add_special && model->contract.add_bos && model->contract.bos_token_id)
      ids.insert(ids.begin(), static_cast<int32_t>(*model->contract.bos_token_id));
    need(ids.size() <= INT32_MAX, "too many tokens");
    const size_t n = std::min<size_t>(ids.size(), static_cast<size_t>(n_tokens_max));
    if (n) std::memcpy(tokens, ids.data(), n * sizeof(el_token));
    count = static_cast<int32_t>(ids.size());
  });
  return st == EL_OK ? count : -static_cast<int32_t>(st);
}

int32_t el_detokenize(const el_model* model, const el_token* tokens, int32_t n_tokens, bool skip_special, char* buf,
                      size_t len) {
  int32_t count = 0;
  const el_status st = guard([&] {
    const Tokenizer& tok = tokenizer_of(model);
    need(n_tokens >= 0 && (tokens != nullptr || n_tokens == 0), "tokens is NULL or n_tokens < 0");
    count = copy_out(tok.decode(std::vector<int32_t>(tokens, tokens + n_tokens), skip_special), buf, len);
  });
  return st == EL_OK ? count : -static_cast<int32_t>(st);
}

int32_t el_token_to_piece(const el_model* model, el_token token, char* buf, size_t len) {
  return el_detokenize(model, &token, 1, false, buf, len);
}

el_status el_detokenizer_create(const el_model* model, el_detokenizer** out) {
  if (out) *out = nullptr;
  return guard([&] {
    need(out != nullptr, "out is NULL");
    const Tokenizer& tok = tokenizer_of(model);
    *out = new el_detokenizer{model, IncrementalDecoder(tok), std::string()};
  });
}

void el_detokenizer_free(el_detokenizer* detokenizer) { delete detokenizer; }

el_status el_detokenizer_push(el_detokenizer* d, el_token token, const char** piece, size_t* piece_len) {
  return guard([&] {
    need(d != nullptr && piece != nullptr && piece_len != nullptr, "detokenizer, piece or piece_len is NULL");
    std::string unused;
    if (!d->model->tokenizer->id_to_token(token, unused))
      raise(EL_ERR_INVALID_ARGUMENT, "token id " + std::to_string(token) + " is not in the tokenizer's vocabulary");
    d->piece = d->decoder.push(token);
    *piece = d->piece.c_str();
    *piece_len = d->piece.size();
  });
}

el_status el_detokenizer_flush(el_detokenizer* d, const char** piece, size_t* piece_len) {
  return guard([&] {
    need(d != nullptr && piece != nullptr && piece_len != nullptr, "detokenizer, piece or piece_len is NULL");
    d->piece = d->decoder.flush();
    *piece = d->piece.c_str();
    *piece_len = d->piece.size();
  });
}

// ---------------------------------------------------------------------------------------------
// generation options and sampler

el_generation_params el_generation_default_params(const el_model* model) {
  el_generation_params p;
  std::memset(&p, 0, sizeof(p));
  p.max_new_tokens = 64;
  p.temperature = 0.0;
  p.top_k = 0;
  p.top_p = 1.0;
  p.min_p = 0.0;
  p.repetition_penalty = 1.0;
  if (model) {  // GenerationConfig.from_defaults
    const Contract& c = model->contract;
    if (c.do_sample.value_or(false)) {
      if (c.temperature) p.temperature = *c.temperature;
      if (c.top_k) p.top_k = static_cast<int32_t>(std::min<int64_t>(*c.top_k, INT32_MAX));
      if (c.top_p) p.top_p = *c.top_p;
    }
    if (c.repetition_penalty) p.repetition_penalty = *c.repetition_penalty;
    if (c.max_new_tokens) p.max_new_tokens = static_cast<int32_t>(std::min<int64_t>(*c.max_new_tokens, INT32_MAX));
  }
  return p;
}

el_status el_generation_params_check(const el_generation_params* params) {
  return guard([&] {
    need(params != nullptr, "params is NULL");
    check_generation(*params);
  });
}

el_status el_sampler_create(const el_generation_params* params, el_sampler** out) {
  if (out) *out = nullptr;
  return guard([&] {
    need(params != nullptr && out != nullptr, "params or out is NULL");
    check_generation(*params);
    *out = new el_sampler{Sampler(sampling_config(*params), params->has_seed ? params->seed : random_seed())};
  });
}

void el_sampler_free(el_sampler* sampler) { delete sampler; }

uint64_t el_sampler_seed(const el_sampler* sampler) { return sampler ? sampler->sampler.seed() : 0; }

el_token el_sampler_sample(el_sampler* sampler, const float* logits, int32_t n_vocab, const el_token* history,
                           size_t n_history) {
  el_token token = EL_TOKEN_NONE;
  const el_status st = guard([&] {
    need(sampler != nullptr && logits != nullptr && n_vocab > 0, "sampler or logits is NULL, or n_vocab <= 0");
    need(history != nullptr || n_history == 0, "history is NULL");
    token = sampler->sampler.sample(logits, static_cast<size_t>(n_vocab), history, n_history);
  });
  return st == EL_OK ? token : -static_cast<el_token>(st);
}

// ---------------------------------------------------------------------------------------------
// sessions

el_session_params el_session_default_params(void) {
  el_session_params p;
  p.exit_policy = nullptr;
  p.max_loops = 0;
  return p;
}

el_status el_session_create(el_model* model, el_session_params params, el_session** out) {
  if (out) *out = nullptr;
  return guard([&] {
    need(model != nullptr && out != nullptr, "model or out is NULL");
    const Contract& c = model->contract;
    need(params.max_loops >= 0 && params.max_loops <= 65536, "max_loops must be in [0, 65536]");
    auto s = std::make_unique<el_session>();
    s->model = model;
    s->max_loops = params.max_loops;
    s->policy = parse_exit_policy(params.exit_policy ? params.exit_policy : c.exit_policy, static_cast<int>(c.loops),
                                  c.exit_gate, c.exit_threshold);
    if (s->policy.kind == "speculate")
      raise(EL_ERR_UNSUPPORTED, "the native runtime does not do self-speculation (speculate:DxN) yet; use the Python "
                                "runtime or another policy");
    if (c.kv_strategy != "fill" && c.kv_strategy != "recursion")
      raise(EL_ERR_CORRUPT_ARTIFACT, "unknown KV strategy '" + c.kv_strategy + "' in exit.kv_strategy");
    s->sequence = std::make_unique<Sequence>(*model->tvm, s->host(), c.kv_strategy);
    *out = s.release();
  });
}

void el_session_free(el_session* session) { delete session; }

int32_t el_session_n_past(const el_session* session) {
  return session ? static_cast<int32_t>(session->sequence->length()) : 0;
}

int32_t el_session_exit_policy(const el_session* session, char* buf, size_t len) {
  if (!session) return -fail(EL_ERR_INVALID_ARGUMENT, "session is NULL");
  std::string s = session->policy.str();
  if (session->max_loops) s += ", at most " + std::to_string(session->max_loops) + " loops";
  return copy_out(s, buf, len);
}

el_status el_session_rewind(el_session* session, int32_t n_keep) {
  return guard([&] {
    need(session != nullptr, "session is NULL");
    need(n_keep >= 0, "n_keep must be >= 0");
    session->sequence->rewind(n_keep);
    if (session->cached.size() > static_cast<size_t>(n_keep)) session->cached.resize(n_keep);
  });
}

el_status el_session_decode(el_session* session, const el_token* tokens, int32_t n_tokens, bool all_logits,
                            float* logits, size_t n_logits, int32_t* depth) {
  return guard([&] {
    need(session != nullptr, "session is NULL");
    need(tokens != nullptr && n_tokens > 0, "tokens is NULL or n_tokens <= 0");
    const size_t vocab = static_cast<size_t>(session->model->contract.vocab_size);
    const size_t wanted = n_logits == 0 ? 0 : (all_logits ? vocab * n_tokens : vocab);
    need(n_logits == 0 || (logits != nullptr && n_logits >= wanted),
         "logits is NULL or too small (n_vocab floats, or n_tokens x n_vocab with all_logits)");
    std::optional<TokenExit> exit;
    if (n_tokens == 1 && session->policy.exits()) exit.emplace(session->policy);
    StepOutput out = session->sequence->step(tokens, static_cast<size_t>(n_tokens), all_logits, exit ? &*exit : nullptr,
                                             session->max_loops);
    session->cached.insert(session->cached.end(), tokens, tokens + n_tokens);
    if (wanted) std::memcpy(logits, out.logits.data() + (out.logits.size() - wanted), wanted * sizeof(float));
    if (depth) *depth = out.depth;
  });
}

el_status el_generate(el_session* session, const char* prompt, const el_generation_params* params,
                      el_token_callback callback, void* user_data, el_generation_result* result) {
  el_generation_result local;
  el_generation_result& r = result ? *result : local;
  r = el_generation_result{};
  return guard([&] {
    need(session != nullptr && params != nullptr, "session or params is NULL");
    need(prompt != nullptr, "prompt is NULL");
    const Tokenizer& tok = tokenizer_of(session->model);
    std::vector<int32_t> ids = tok.encode(prompt);
    const Contract& c = session->model->contract;
    if (c.add_bos && c.bos_token_id) ids.insert(ids.begin(), static_cast<int32_t>(*c.bos_token_id));
    generate(*session, std::move(ids), *params, callback, user_data, r);
  });
}

el_status el_generate_tokens(el_session* session, const el_token* prompt, int32_t n_prompt,
                             const el_generation_params* params, el_token_callback callback, void* user_data,
                             el_generation_result* result) {
  el_generation_result local;
  el_generation_result& r = result ? *result : local;
  r = el_generation_result{};
  return guard([&] {
    need(session != nullptr && params != nullptr, "session or params is NULL");
    need(n_prompt >= 0 && (prompt != nullptr || n_prompt == 0), "prompt is NULL or n_prompt < 0");
    generate(*session, std::vector<int32_t>(prompt, prompt + n_prompt), *params, callback, user_data, r);
  });
}

void el_session_cancel(el_session* session) {
  if (session) session->cancel.store(true);
}

int32_t el_session_text(const el_session* session, char* buf, size_t len) {
  if (!session) return -fail(EL_ERR_INVALID_ARGUMENT, "session is NULL");
  return copy_out(session->text, buf, len);
}

int32_t el_session_tokens(const el_session* session, el_token* tokens, int32_t* depths, int32_t n_max) {
  if (!session) return -fail(EL_ERR_INVALID_ARGUMENT, "session is NULL");
  const size_t n = std::min<size_t>(session->tokens.size(), n_max > 0 ? static_cast<size_t>(n_max) : 0);
  if (tokens && n) std::memcpy(tokens, session->tokens.data(), n * sizeof(el_token));
  if (depths && n) std::memcpy(depths, session->depths.data(), n * sizeof(int32_t));
  return static_cast<int32_t>(session->tokens.size());
}
