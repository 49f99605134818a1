// The TVM side of a model: the compiled library (a Relax VM executable), its parameters and
// entry points, looked up by the names and argument roles the contract gives (runtimes/tvm.py is
// the reference for every call), and one sequence's paged KV cache on either the fused functions
// (forward / decode) or the host-driven loop (prologue / block / kv_fill / epilogue).
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include "contract.h"
#include "exits.h"

namespace edgeloop {

class TvmModel {
 public:
  // Loads `library` (the artifact's tvm.library, or a path the caller linked from it) and the
  // params. Throws Error (EL_ERR_TVM, EL_ERR_CORRUPT_ARTIFACT, EL_ERR_UNSUPPORTED).
  TvmModel(const Contract& contract, const std::string& dir, const std::string& library, int threads);

  const Contract& contract() const { return contract_; }
  int64_t vocab() const { return contract_.vocab_size; }
  int64_t loops() const { return contract_.loops; }
  int64_t max_context() const { return contract_.max_context; }
  bool host_loop() const { return contract_.host_loop && contract_.has_entry("block"); }

  // One call of entry point `name` with arguments bound by role (Error(EL_ERR_TVM) on failure).
  tvm::ffi::Any call(const std::string& name, const std::map<std::string, tvm::ffi::AnyView>& by_role) const;
  tvm::ffi::Tensor tensor(const std::vector<int64_t>& shape, DLDataType dtype, const void* data) const;
  tvm::ffi::Tensor tokens(const int32_t* ids, size_t n) const;
  tvm::ffi::Tensor int32s(const std::vector<int32_t>& values) const;
  const tvm::ffi::Array<tvm::ffi::Tensor>& params() const { return params_; }

  tvm::ffi::Function add_sequence{nullptr}, remove_sequence{nullptr}, begin_forward{nullptr}, end_forward{nullptr},
      popn{nullptr};
  std::mutex mutex;  // the VM is not reentrant: one call at a time across the model's sessions

 private:
  Contract contract_;
  std::optional<tvm::ffi::Module> library_, vm_;
  tvm::ffi::Array<tvm::ffi::Tensor> params_;
  std::map<std::string, tvm::ffi::Function> functions_;
  tvm::ffi::Function alloc_{nullptr};
  DLDataType token_dtype_;
};

struct StepOutput {
  std::vector<float> logits;  // [rows, vocab]
  int64_t rows = 0;
  int depth = 0;                // loop passes the (last) token ran
  std::optional<double> gate;   // the exit gate's probability at the last position, when the model has one
};

// One sequence in its own KV cache. Not thread-safe; calls into TVM hold TvmModel::mutex.
class Sequence {
 public:
  Sequence(TvmModel& model, bool host, std::string kv_strategy);
  ~Sequence();
  Sequence(const Sequence&) = delete;
  Sequence& operator=(const Sequence&) = delete;

  bool host() const { return host_; }
  int64_t length() const { return length_; }
  // Append `n` tokens (full depth, or the host-driven loop with `exit` deciding for a decode token
  // and `cap` passes at most). Throws EL_ERR_CONTEXT_FULL (nothing changed) or EL_ERR_TVM.
  StepOutput step(const int32_t* ids, size_t n, bool all_logits, TokenExit* exit, int cap);
  void rewind(int64_t length);  // keep the first `length` tokens

 private:
  StepOutput fused_step(const int32_t* ids, size_t n, bool all_logits);
  StepOutput host_step(const int32_t* ids, size_t n, bool all_logits, TokenExit* exit, int cap);
  tvm::ffi::Tensor host_call(const std::string& entry, const tvm::ffi::Tensor& x, const std::vector<int>& depths,
                             int64_t rows_per_depth);
  StepOutput head(const tvm::ffi::Tensor& hidden, bool all_rows);

  TvmModel& model_;
  bool host_;
  std::string strategy_;
  tvm::ffi::Any kv_;
  int64_t length_ = 0;
  std::vector<std::vector<int64_t>> written_;  // host-driven: positions stored at each depth
};

}  // namespace edgeloop
