// The artifact contract (edgeloop.json), read and checked the way runtimes/contract.py does:
// format and version, the manifest digest, the JSON Schema (embedded at build time from
// runtimes/schema/artifact.schema.json), consistency, file-name confinement; then, separately,
// the size and sha256 of every listed file. Only the fields the native runtime uses are kept.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace edgeloop {

constexpr const char* kFormat = "edgeloop-artifact";
constexpr int kVersion = 2;
constexpr const char* kManifest = "edgeloop.json";

struct TensorSpec {
  std::string name, role, dtype;
  std::optional<std::string> kv;
};

struct EntryPoint {
  std::string symbol;
  std::vector<TensorSpec> inputs, outputs;
  bool has_output(const std::string& role) const;
};

struct FileEntry {
  std::string sha256;
  int64_t bytes = 0;
};

struct Contract {
  std::string backend, target;
  // model
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0;
  bool exit_gate = false;
  std::optional<double> exit_threshold;
  // loop state
  int64_t loops = 1;
  bool host_loop = false;
  // KV layout
  std::string kv_kind, kv_dtype;
  int64_t max_context = 0, page_size = 0, prefill_chunk = 0;
  std::map<std::string, EntryPoint> entry_points;
  // tokenizer
  std::optional<std::string> tokenizer_file;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;
  bool add_bos = false;
  // generation defaults (null = unset)
  std::optional<bool> do_sample;
  std::optional<double> temperature, top_p, repetition_penalty;
  std::optional<int64_t> top_k, max_new_tokens;
  // TVM
  std::string tvm_library, tvm_params, tvm_device, token_dtype;
  std::vector<std::string> param_names;
  // default early exit
  std::string exit_policy = "none", kv_strategy = "fill";
  std::map<std::string, FileEntry> files;

  bool has_entry(const std::string& name) const { return entry_points.count(name) != 0; }
  const EntryPoint& entry(const std::string& name) const;  // EL_ERR_CORRUPT_ARTIFACT when absent
  std::vector<std::pair<std::string, std::string>> referenced_files() const;  // (file, what names it)
};

// Checks 1-4 of runtimes/contract.py and file-name confinement; opens no file but the manifest.
// Throws edgeloop::Error (EL_ERR_IO, EL_ERR_CORRUPT_ARTIFACT, EL_ERR_VERSION, EL_ERR_CHECKSUM).
Contract load_contract(const std::string& dir);

// Parses manifest bytes (`where` names the file in messages). Same checks, no file system access.
Contract parse_contract(const std::string& raw, const std::string& where);

// The manifest digest: sha256 of `raw` with the manifest_sha256 value replaced by 64 '0'.
std::string manifest_digest(const std::string& raw);

// Every listed file (except those in `skip`) exists with its recorded size and sha256.
void verify_files(const std::string& dir, const Contract& contract, const std::set<std::string>& skip = {});

// dir/name for a plain file name inside dir (no separators, "..", hidden names, symlinks).
std::string confined_file(const std::string& dir, const std::string& name, const std::string& what);

// The schema compiled into the library (runtimes/schema/artifact.schema.json).
const std::string& embedded_schema();

}  // namespace edgeloop
