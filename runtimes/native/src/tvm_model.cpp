// TVM runtime calls over the tvm-ffi C++ API (the apache-tvm wheel ships no tvm/support/io.h, so
// tvm/runtime/tensor.h is not usable: tensors are made with runtime.TVMTensorAllocWithScope).
#include "tvm_model.h"

#include <cstring>
#include <sstream>

#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/string.h>

#include "error.h"

namespace edgeloop {

namespace ffi = tvm::ffi;

namespace {

// The last line of a TVM error, short (TVM messages carry tracebacks).
std::string brief(const std::exception& e) {
  std::string s = e.what();
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  const size_t nl = s.rfind('\n');
  if (nl != std::string::npos) s = s.substr(nl + 1);
  return s.size() > 200 ? s.substr(0, 200) : s;
}

ffi::Function global(const char* name) {
  auto f = ffi::Function::GetGlobal(name);
  if (!f) raise(EL_ERR_TVM, std::string("the TVM runtime lacks ") + name + "; link the TVM runtime of the wheel's version");
  return *f;
}

DLDataType dtype_of(const std::string& name) {
  if (name == "int32") return DLDataType{kDLInt, 32, 1};
  if (name == "int64") return DLDataType{kDLInt, 64, 1};
  if (name == "float32") return DLDataType{kDLFloat, 32, 1};
  if (name == "float16") return DLDataType{kDLFloat, 16, 1};
  raise(EL_ERR_UNSUPPORTED, "the native runtime does not handle dtype " + name);
}

size_t nbytes(const ffi::Tensor& t) {
  return static_cast<size_t>(t.numel()) * ((t.dtype().bits * t.dtype().lanes + 7) / 8);
}

const char* bytes_of(const ffi::Tensor& t) {
  return static_cast<const char*>(t.data_ptr()) + t.GetDLTensorPtr()->byte_offset;
}

void read_floats(const ffi::Tensor& t, std::vector<float>& out, int64_t& rows) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 32 || t.ndim() != 2 || !t.IsContiguous())
    raise(EL_ERR_CORRUPT_ARTIFACT, "the model returned logits that are not a float32 [n, vocab] tensor; compile the "
                                   "artifact again");
  rows = t.shape()[0];
  out.resize(static_cast<size_t>(t.numel()));
  std::memcpy(out.data(), bytes_of(t), out.size() * sizeof(float));
}

}  // namespace

TvmModel::TvmModel(const Contract& contract, const std::string& dir, const std::string& library, int threads)
    : contract_(contract) {
  if (contract.backend != "tvm")
    raise(EL_ERR_UNSUPPORTED, "this is an ONNX Runtime artifact; the native runtime runs TVM artifacts (compile "
                              "with --backend tvm)");
  if (contract.tvm_device != "cpu")
    raise(EL_ERR_UNSUPPORTED, "this artifact was compiled for --target " + contract.target + " (" +
                                  contract.tvm_device + "); the native runtime runs CPU artifacts so far (--target "
                                  "cpu or android-cpu)");
  if (contract.kv_kind != "paged")
    raise(EL_ERR_CORRUPT_ARTIFACT, "a TVM artifact must use the paged KV cache; compile it again");
  for (const char* needed : {"create_kv_cache", "forward", "decode"}) contract.entry(needed);
  token_dtype_ = dtype_of(contract.token_dtype);
  try {
    if (threads > 0) global("runtime.config_threadpool")(1, threads);
    library_.emplace(ffi::Module::LoadFromFile(library));
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    raise(EL_ERR_TVM, "TVM cannot load " + library + ": " + brief(e) +
                          "; the library does not fit this TVM runtime or this machine, compile the artifact again");
  }
  try {
    auto load = (*library_)->GetFunction("vm_load_executable");
    if (!load) raise(EL_ERR_CORRUPT_ARTIFACT, library + " is not a Relax VM executable; compile the artifact again");
    vm_.emplace((*load)().cast<ffi::Module>());
    (*(*vm_)->GetFunction("vm_initialization"))(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    alloc_ = global("runtime.TVMTensorAllocWithScope");
    const std::string params_path = dir + "/" + contract.tvm_params;
    auto stored = global("runtime.LoadParamsFromFile")(params_path).cast<ffi::Map<ffi::String, ffi::Tensor>>();
    for (const auto& name : contract.param_names) {
      auto it = stored.find(name);
      if (it == stored.end())
        raise(EL_ERR_CORRUPT_ARTIFACT, params_path + " lacks " + name + "; the artifact is corrupt, compile it again");
      params_.push_back((*it).second);
    }
    for (const auto& [name, entry] : contract.entry_points) {
      auto f = (*vm_)->GetFunction(entry.symbol);
      if (!f)
        raise(EL_ERR_CORRUPT_ARTIFACT, "the library of " + dir + " has no function '" + entry.symbol +
                                           "' its contract promises; compile the artifact again");
      functions_.emplace(name, *f);
    }
    add_sequence = global("vm.builtin.kv_state_add_sequence");
    remove_sequence = global("vm.builtin.kv_state_remove_sequence");
    begin_forward = global("vm.builtin.kv_state_begin_forward");
    end_forward = global("vm.builtin.kv_state_end_forward");
    popn = global("vm.builtin.kv_state_popn");
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    raise(EL_ERR_TVM, "TVM cannot load " + dir + ": " + brief(e) + "; the artifact is damaged, compile it again");
  }
}

ffi::Any TvmModel::call(const std::string& name, const std::map<std::string, ffi::AnyView>& by_role) const {
  const EntryPoint& entry = contract_.entry(name);
  std::vector<ffi::AnyView> args;
  for (const TensorSpec& t : entry.inputs) {
    const auto it = by_role.find(t.role);
    if (it == by_role.end())
      raise(EL_ERR_CORRUPT_ARTIFACT, name + " takes an input with role '" + t.role + "' that this runtime does not "
                                     "know; it was compiled by another edgeloop: compile it again");
    args.push_back(it->second);
  }
  ffi::Any result;
  try {
    functions_.at(name).CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    raise(EL_ERR_TVM, "TVM failed running " + name + ": " + brief(e));
  }
  return result;
}

ffi::Tensor TvmModel::tensor(const std::vector<int64_t>& shape, DLDataType dtype, const void* data) const {
  ffi::Tensor t = alloc_(ffi::Shape(shape.begin(), shape.end()), dtype, DLDevice{kDLCPU, 0}, ffi::Optional<ffi::String>())
                      .cast<ffi::Tensor>();
  if (data) std::memcpy(t.data_ptr(), data, nbytes(t));
  return t;
}

ffi::Tensor TvmModel::tokens(const int32_t* ids, size_t n) const {
  if (token_dtype_.bits == 32) return tensor({static_cast<int64_t>(n)}, token_dtype_, ids);
  std::vector<int64_t> wide(ids, ids + n);
  return tensor({static_cast<int64_t>(n)}, token_dtype_, wide.data());
}

ffi::Tensor TvmModel::int32s(const std::vector<int32_t>& values) const {
  return tensor({static_cast<int64_t>(values.size())}, DLDataType{kDLInt, 32, 1}, values.data());
}

// ---------------------------------------------------------------------------------------------
// Sequence

Sequence::Sequence(TvmModel& model, bool host, std::string kv_strategy)
    : model_(model), host_(host), strategy_(std::move(kv_strategy)) {
  const Contract& c = model.contract();
  if (host && !model.host_loop())
    raise(EL_ERR_UNSUPPORTED, "early exit needs the host-driven loop, which this model does not have (it has more "
                              "than one looped stage: use CYCLE sharing); use the exit policy \"none\"");
  const int64_t seqs = host ? c.loops : 1;
  std::lock_guard<std::mutex> lock(model.mutex);
  try {
    // [max_batch, max_total_seq_len, prefill_chunk, page_size, 0], as runtimes/tvm.py _Group does
    const ffi::Shape cfg({seqs, seqs * c.max_context, c.prefill_chunk, c.page_size, 0});
    kv_ = model.call(host ? "create_step_kv_cache" : "create_kv_cache", {{"kv_config", cfg}});
    for (int64_t s = 0; s < seqs; ++s) model.add_sequence(kv_, s);
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    raise(EL_ERR_TVM, std::string("TVM cannot create the KV cache: ") + brief(e));
  }
  written_.assign(host ? c.loops : 0, {});
}

Sequence::~Sequence() {
  std::lock_guard<std::mutex> lock(model_.mutex);
  kv_ = ffi::Any();  // the cache is freed with its last reference
}

void Sequence::rewind(int64_t length) {
  length = std::max<int64_t>(0, length);
  if (length >= length_) return;
  std::lock_guard<std::mutex> lock(model_.mutex);
  try {
    if (host_) {
      for (size_t d = 0; d < written_.size(); ++d) {
        auto& positions = written_[d];
        int64_t drop = 0;
        for (int64_t p : positions) drop += p >= length ? 1 : 0;
        if (drop) {
          model_.popn(kv_, static_cast<int64_t>(d), drop);
          positions.resize(positions.size() - drop);
        }
      }
    } else {
      model_.popn(kv_, int64_t{0}, length_ - length);
    }
  } catch (const std::exception& e) {
    raise(EL_ERR_TVM, std::string("TVM cannot rewind the KV cache: ") + brief(e));
  }
  length_ = length;
}

StepOutput Sequence::step(const int32_t* ids, size_t n, bool all_logits, TokenExit* exit, int cap) {
  if (n == 0) raise(EL_ERR_INVALID_ARGUMENT, "a step needs at least one token");
  const int64_t vocab = model_.vocab();
  for (size_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= vocab)
      raise(EL_ERR_INVALID_ARGUMENT, "token id " + std::to_string(ids[i]) + " is outside the vocabulary [0, " +
                                         std::to_string(vocab) + ")");
  if (length_ + static_cast<int64_t>(n) > model_.max_context())
    raise(EL_ERR_CONTEXT_FULL, std::to_string(length_ + static_cast<int64_t>(n)) + " tokens exceed the artifact's "
                               "context of " + std::to_string(model_.max_context()) +
                               "; rewind the session or start a new one");
  std::lock_guard<std::mutex> lock(model_.mutex);
  if (!host_) return fused_step(ids, n, all_logits);
  // the host-driven loop takes at most one prefill chunk per call (runtimes/tvm.py feeds prompts whole)
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(1, model_.contract().prefill_chunk));
  StepOutput out;
  for (size_t start = 0; start < n; start += chunk) {
    const size_t m = std::min(chunk, n - start);
    StepOutput part = host_step(ids + start, m, all_logits, m == n ? exit : nullptr, cap);
    if (all_logits) out.logits.insert(out.logits.end(), part.logits.begin(), part.logits.end()), out.rows += part.rows;
    if (start + m == n) {
      if (!all_logits) out = std::move(part);
      else out.depth = part.depth, out.gate = part.gate;
    }
  }
  return out;
}

StepOutput Sequence::fused_step(const int32_t* ids, size_t n, bool all_logits) {
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(1, model_.contract().prefill_chunk));
  StepOutput out;
  out.depth = static_cast<int>(model_.loops());
  for (size_t start = 0; start < n; start += chunk) {  // runtimes/tvm.py step(): one prefill chunk per call
    const size_t m = std::min(chunk, n - start);
    ffi::Tensor tokens = model_.tokens(ids + start, m);
    ffi::Any logits;
    model_.begin_forward(kv_, ffi::Shape({0}), ffi::Shape({static_cast<int64_t>(m)}));
    try {
      if (m == 1) {
        logits = model_.call("decode", {{"input_ids", tokens}, {"kv_cache", kv_}, {"params", model_.params()}});
      } else {
        std::vector<int32_t> pos;
        if (all_logits)
          for (size_t i = 0; i < m; ++i) pos.push_back(static_cast<int32_t>(i));
        else
          pos.push_back(static_cast<int32_t>(m - 1));
        ffi::Tensor positions = model_.int32s(pos);
        logits = model_.call("forward", {{"input_ids", tokens}, {"kv_cache", kv_}, {"logit_positions", positions},
                                         {"params", model_.params()}});
      }
    } catch (...) {
      model_.end_forward(kv_);
      throw;
    }
    model_.end_forward(kv_);
    length_ += static_cast<int64_t>(m);
    std::vector<float> part;
    int64_t rows = 0;
    read_floats(logits.cast<ffi::Tensor>(), part, rows);
    if (all_logits || start + m == n) {
      if (!all_logits) out.logits.clear(), out.rows = 0;
      out.logits.insert(out.logits.end(), part.begin(), part.end());
      out.rows += rows;
    }
  }
  return out;
}

ffi::Tensor Sequence::host_call(const std::string& entry, const ffi::Tensor& x, const std::vector<int>& depths,
                                int64_t rows_per_depth) {
  // runtimes/tvm.py _host_call: each (stream, depth) pair is its own sequence of the step cache
  std::vector<int64_t> seqs, lengths;
  std::vector<int32_t> depth, pos;
  for (int d : depths) {
    auto& written = written_[d];
    for (int64_t i = 0; i < rows_per_depth; ++i) {
      written.push_back(length_ + i);
      depth.push_back(d);
      pos.push_back(static_cast<int32_t>(length_ + i));
    }
    seqs.push_back(d);
    lengths.push_back(rows_per_depth);
  }
  ffi::Tensor depth_t = model_.int32s(depth), pos_t = model_.int32s(pos);
  model_.begin_forward(kv_, ffi::Shape(seqs.begin(), seqs.end()), ffi::Shape(lengths.begin(), lengths.end()));
  ffi::Any y;
  try {
    y = model_.call(entry, {{"hidden", x}, {"kv_cache", kv_}, {"depth", depth_t}, {"positions", pos_t},
                            {"params", model_.params()}});
  } catch (...) {
    model_.end_forward(kv_);
    throw;
  }
  model_.end_forward(kv_);
  return entry == "block" ? y.cast<ffi::Tensor>() : ffi::Tensor();
}

StepOutput Sequence::head(const ffi::Tensor& hidden, bool all_rows) {
  ffi::Tensor x = hidden;
  if (!all_rows && hidden.shape()[0] > 1) {  // the last position only
    const int64_t h = hidden.shape()[1];
    const size_t row = nbytes(hidden) / static_cast<size_t>(hidden.shape()[0]);
    x = model_.tensor({1, h}, hidden.dtype(), bytes_of(hidden) + row * (hidden.shape()[0] - 1));
  }
  ffi::Any res = model_.call("epilogue", {{"hidden", x}, {"params", model_.params()}});
  StepOutput out;
  if (model_.contract().entry("epilogue").has_output("exit_score")) {
    auto parts = res.cast<ffi::Array<ffi::Any>>();
    read_floats(parts[0].cast<ffi::Tensor>(), out.logits, out.rows);
    ffi::Tensor score = parts[1].cast<ffi::Tensor>();
    if (score.dtype().code == kDLFloat && score.dtype().bits == 32 && score.numel() > 0)
      out.gate = static_cast<double>(reinterpret_cast<const float*>(bytes_of(score))[score.numel() - 1]);
  } else {
    read_floats(res.cast<ffi::Tensor>(), out.logits, out.rows);
  }
  return out;
}

StepOutput Sequence::host_step(const int32_t* ids, size_t n, bool all_logits, TokenExit* exit, int cap) {
  // runtimes/stepping.py host_step for one row
  const int loops = static_cast<int>(model_.loops());
  ffi::Tensor hidden = model_.call("prologue", {{"input_ids", model_.tokens(ids, n)}, {"params", model_.params()}})
                           .cast<ffi::Tensor>();
  StepOutput out;
  bool done = false;
  for (int p = 0; p < loops && !done; ++p) {
    hidden = host_call("block", hidden, {p}, static_cast<int64_t>(n));
    const bool last = p == loops - 1;
    const bool capped = cap > 0 && cap <= p + 1;
    // the boundaries where the policy looks at the logits; forced depths decide on the count alone
    // and need the head only where the token leaves (as runtimes/stepping.py host_step)
    bool forced = false;
    if (!(last || capped) && exit && exit->policy().exits() && !exit->needs_logits()) {
      forced = exit->decide(p + 1, nullptr, 0, std::nullopt);
      if (!forced) continue;
    }
    const bool probe = exit && exit->policy().exits();
    if (!(last || capped || probe || forced)) continue;
    StepOutput h = head(hidden, all_logits);
    done = last || capped || forced;
    if (!done && exit) {
      const float* row = h.logits.data() + (h.rows - 1) * model_.vocab();
      done = exit->decide(p + 1, row, static_cast<size_t>(model_.vocab()), h.gate);
    }
    if (done) {
      out = std::move(h);
      out.depth = p + 1;
      if (!last && strategy_ == "fill") {  // the skipped depths hold K/V computed from the exit state
        std::vector<int> depths;
        for (int d = p + 1; d < loops; ++d) depths.push_back(d);
        const size_t bytes = nbytes(hidden);
        const int64_t h_size = hidden.shape()[1];
        ffi::Tensor x = model_.tensor({static_cast<int64_t>(n * depths.size()), h_size}, hidden.dtype(), nullptr);
        for (size_t i = 0; i < depths.size(); ++i)
          std::memcpy(static_cast<char*>(x.data_ptr()) + i * bytes, bytes_of(hidden), bytes);
        host_call("kv_fill", x, depths, static_cast<int64_t>(n));
      }
    }
  }
  length_ += static_cast<int64_t>(n);
  return out;
}

}  // namespace edgeloop
