// What the C API's opaque handles hold, and helpers shared by the C boundary (edgeloop.cpp) and
// the generation loop (generate.cpp).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "contract.h"
#include "edgeloop.h"
#include "exits.h"
#include "sampler.h"
#include "text_stream.h"
#include "tokenizer.h"
#include "tvm_model.h"

struct el_model {
  std::string path;
  edgeloop::Contract contract;
  std::unique_ptr<edgeloop::Tokenizer> tokenizer;  // null when the artifact has none
  std::unique_ptr<edgeloop::TvmModel> tvm;
};

struct el_session {
  el_model* model = nullptr;
  edgeloop::ExitPolicy policy;
  int max_loops = 0;  // 0: all passes
  std::unique_ptr<edgeloop::Sequence> sequence;
  std::vector<int32_t> cached;  // the tokens whose KV the sequence holds
  // the last generation
  std::vector<int32_t> tokens, depths;
  std::string text;
  std::atomic<bool> cancel{false};

  bool host() const { return policy.kind != "none" || max_loops > 0; }
};

struct el_sampler {
  edgeloop::Sampler sampler;
};

struct el_detokenizer {
  const el_model* model;
  edgeloop::IncrementalDecoder decoder;
  std::string piece;
};

namespace edgeloop {

void log(el_log_level level, const std::string& message);
SamplingConfig sampling_config(const el_generation_params& p);
void check_generation(const el_generation_params& p);  // throws Error(EL_ERR_INVALID_ARGUMENT)

// The generation loop behind el_generate / el_generate_tokens (a port of runtimes/model.py Request).
void generate(el_session& session, std::vector<int32_t> ids, const el_generation_params& params,
              el_token_callback callback, void* user_data, el_generation_result& result);

}  // namespace edgeloop
