// Reading and checking edgeloop.json (see contract.h and runtimes/contract.py, the reference).
#include "contract.h"

#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "error.h"
#include "json_schema.h"
#include "sha256.h"

namespace edgeloop {

extern const unsigned char kArtifactSchemaBytes[];  // generated at build time (cmake/embed_file.cmake)
extern const size_t kArtifactSchemaSize;

using nlohmann::json;

namespace {

constexpr const char* kDigestKey = "\"manifest_sha256\": \"";

bool is_hex64(const std::string& s, size_t at) {
  if (at + 64 > s.size()) return false;
  for (size_t i = at; i < at + 64; ++i)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return true;
}

// Offsets of the 64 hex characters of every `"manifest_sha256": "<64 hex>"` (the Python regex).
std::vector<size_t> digest_values(const std::string& raw) {
  std::vector<size_t> out;
  const size_t key = std::strlen(kDigestKey);
  for (size_t at = raw.find(kDigestKey); at != std::string::npos; at = raw.find(kDigestKey, at + 1)) {
    const size_t v = at + key;
    if (is_hex64(raw, v) && v + 64 < raw.size() && raw[v + 64] == '"') {
      out.push_back(v);
      at = v + 64;
    }
  }
  return out;
}

const SchemaValidator& validator() {
  static const SchemaValidator v(json::parse(embedded_schema()));
  return v;
}

template <typename T>
std::optional<T> opt(const json& j, const char* key) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  return it->get<T>();
}

std::string quoted(const std::string& s) { return "'" + s + "'"; }

}  // namespace

const std::string& embedded_schema() {
  static const std::string s(reinterpret_cast<const char*>(kArtifactSchemaBytes), kArtifactSchemaSize);
  return s;
}

bool EntryPoint::has_output(const std::string& role) const {
  for (const auto& t : outputs)
    if (t.role == role) return true;
  return false;
}

const EntryPoint& Contract::entry(const std::string& name) const {
  const auto it = entry_points.find(name);
  if (it == entry_points.end())
    raise(EL_ERR_CORRUPT_ARTIFACT, "this artifact has no '" + name + "' entry point; compile it again with this edgeloop");
  return it->second;
}

std::vector<std::pair<std::string, std::string>> Contract::referenced_files() const {
  std::vector<std::pair<std::string, std::string>> out;
  if (backend == "tvm") {
    out.emplace_back(tvm_library, "tvm.library");
    out.emplace_back(tvm_params, "tvm.params");
  }
  if (tokenizer_file) out.emplace_back(*tokenizer_file, "tokenizer.file");
  return out;
}

std::string manifest_digest(const std::string& raw) {
  std::string copy = raw;
  const auto found = digest_values(copy);
  if (!found.empty()) copy.replace(found[0], 64, std::string(64, '0'));
  return Sha256::hex_of(copy.data(), copy.size());
}

Contract parse_contract(const std::string& raw, const std::string& where) {
  json data;
  try {
    data = json::parse(raw);
  } catch (const json::exception&) {
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " is not valid JSON; the artifact is corrupt, compile it again");
  }
  if (!data.is_object() || data.value("format", json()) != kFormat)
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " is not an edgeloop artifact manifest");
  const json version = data.value("version", json());
  if (!version.is_number_integer())
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " has no valid format version; the artifact is corrupt, compile it again");
  const int64_t v = version.get<int64_t>();
  if (v < kVersion)
    raise(EL_ERR_VERSION, where + " was compiled by an older edgeloop (artifact format " + std::to_string(v) +
                              ", this edgeloop reads " + std::to_string(kVersion) + "): compile it again");
  if (v > kVersion)
    raise(EL_ERR_VERSION, where + " needs a newer edgeloop (artifact format " + std::to_string(v) +
                              ", this edgeloop reads " + std::to_string(kVersion) + "); upgrade edgeloop");
  const auto found = digest_values(raw);
  if (found.size() != 1)
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " has no manifest digest; the artifact is corrupt, compile it again");
  if (manifest_digest(raw) != raw.substr(found[0], 64))
    raise(EL_ERR_CHECKSUM, where + " was modified after compilation (its digest does not match); compile the "
                                   "artifact again");
  const std::string bad = validator().validate(data);
  if (!bad.empty()) raise(EL_ERR_CORRUPT_ARTIFACT, where + " does not match the artifact schema: " + bad);

  // The schema guarantees every type below.
  Contract c;
  c.backend = data["backend"].get<std::string>();
  c.target = data["target"].get<std::string>();
  const json& model = data["model"];
  c.vocab_size = model["vocab_size"].get<int64_t>();
  c.hidden_size = model["hidden_size"].get<int64_t>();
  c.num_layers = model["num_layers"].get<int64_t>();
  c.exit_gate = model.value("exit_gate", false);
  c.exit_threshold = opt<double>(model, "exit_threshold");
  const json& loop = data["loop"];
  const json& rec = data["recursion"];
  c.loops = loop["loops"].get<int64_t>();
  c.host_loop = loop["host_loop"].get<bool>();
  int64_t rec_depths = 0;
  for (const json& s : rec.value("stages", json::array()))
    rec_depths += static_cast<int64_t>(s["blocks"].size()) * s["repeats"].get<int64_t>();
  const json& kv = data["kv"];
  c.kv_kind = kv["kind"].get<std::string>();
  c.kv_dtype = kv["dtype"].get<std::string>();
  c.max_context = kv["max_context"].get<int64_t>();
  c.page_size = kv.value("page_size", int64_t{0});
  c.prefill_chunk = kv.value("prefill_chunk", int64_t{0});
  for (const auto& [name, e] : data["entry_points"].items()) {
    EntryPoint ep;
    ep.symbol = e["symbol"].get<std::string>();
    for (const char* side : {"inputs", "outputs"})
      for (const json& t : e[side])
        (std::strcmp(side, "inputs") == 0 ? ep.inputs : ep.outputs)
            .push_back({t["name"].get<std::string>(), t["role"].get<std::string>(), t["dtype"].get<std::string>(),
                        opt<std::string>(t, "kv")});
    c.entry_points.emplace(name, std::move(ep));
  }
  const json& tok = data["tokenizer"];
  c.tokenizer_file = opt<std::string>(tok, "file");
  c.bos_token_id = opt<int64_t>(tok, "bos_token_id");
  c.eos_token_ids = tok["eos_token_ids"].get<std::vector<int64_t>>();
  c.add_bos = tok["add_bos"].get<bool>();
  const json& gen = data["generation"];
  c.do_sample = opt<bool>(gen, "do_sample");
  c.temperature = opt<double>(gen, "temperature");
  c.top_k = opt<int64_t>(gen, "top_k");
  c.top_p = opt<double>(gen, "top_p");
  c.repetition_penalty = opt<double>(gen, "repetition_penalty");
  c.max_new_tokens = opt<int64_t>(gen, "max_new_tokens");
  if (data.contains("exit") && !data["exit"].is_null()) {
    c.exit_policy = data["exit"]["policy"].get<std::string>();
    c.kv_strategy = data["exit"].value("kv_strategy", std::string("fill"));
  }
  for (const auto& [name, f] : data["files"].items())
    c.files[name] = FileEntry{f["sha256"].get<std::string>(), f["bytes"].get<int64_t>()};

  // 4. consistency (runtimes/contract.py _check_consistency)
  const bool has_tvm = data.contains("tvm") && !data["tvm"].is_null();
  const bool has_onnx = data.contains("onnx") && !data["onnx"].is_null();
  if ((c.backend == "tvm" && !has_tvm) || (c.backend == "onnxruntime" && !has_onnx))
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " lacks its " + c.backend + " section; the artifact is corrupt, compile "
                                           "it again");
  if (has_tvm) {
    const json& t = data["tvm"];
    c.tvm_library = t["library"].get<std::string>();
    c.tvm_params = t["params"].get<std::string>();
    c.tvm_device = t["device"].get<std::string>();
    c.token_dtype = t.value("token_dtype", std::string("int32"));
    c.param_names = t["param_names"].get<std::vector<std::string>>();
  }
  if (c.files.empty())
    raise(EL_ERR_CORRUPT_ARTIFACT, where + " lists no files, so nothing could be verified; compile the artifact again");
  const int64_t loop_depths = loop["num_depths"].get<int64_t>();
  if (c.loops != rec["loops"].get<int64_t>() || loop["stages"] != rec["stages"] || loop_depths != rec_depths ||
      kv["num_depths"].get<int64_t>() != rec_depths || rec_depths != c.num_layers)
    raise(EL_ERR_CORRUPT_ARTIFACT, where + ": the loop state, KV layout and recursion disagree (loops " +
                                       std::to_string(c.loops) + " vs " + rec["loops"].dump() +
                                       "); the manifest was edited, compile the artifact again");
  std::vector<int64_t> ids = c.eos_token_ids;
  if (c.bos_token_id) ids.push_back(*c.bos_token_id);
  for (int64_t id : ids)
    if (id < 0 || id >= c.vocab_size)
      raise(EL_ERR_CORRUPT_ARTIFACT,
            where + ": a BOS/EOS token id is outside the vocabulary of " + std::to_string(c.vocab_size));
  for (const auto& [name, what] : c.referenced_files())
    if (!c.files.count(name))
      raise(EL_ERR_CORRUPT_ARTIFACT, where + ": " + what + " names " + quoted(name) +
                                         ", which the manifest's files do not list; the artifact is corrupt, "
                                         "compile it again");
  for (const auto& [name, f] : c.files)
    if (!is_hex64(f.sha256, 0) || f.sha256.size() != 64 || f.bytes < 0)
      raise(EL_ERR_CORRUPT_ARTIFACT, where + ": files." + name + " has an invalid checksum or size");
  if (c.loops < 1 || c.max_context < 1 || c.vocab_size < 1 || c.hidden_size < 1)
    raise(EL_ERR_CORRUPT_ARTIFACT, where + ": the model's sizes are invalid; compile the artifact again");
  return c;
}

std::string confined_file(const std::string& dir, const std::string& name, const std::string& what) {
  if (name.empty() || name == "." || name == "..")
    raise(EL_ERR_CORRUPT_ARTIFACT, what + " names an invalid file " + quoted(name) + "; it must be a plain file name "
                                          "inside " + dir);
  if (name.find('/') != std::string::npos || name.find('\\') != std::string::npos ||
      name.find('\0') != std::string::npos || name[0] == '.')
    raise(EL_ERR_CORRUPT_ARTIFACT, what + " names " + quoted(name) + ", which is not a plain file name inside " + dir +
                                       "; refusing to open it");
  const std::string path = dir + "/" + name;
  struct stat st;
  if (::lstat(path.c_str(), &st) == 0 && S_ISLNK(st.st_mode))
    raise(EL_ERR_CORRUPT_ARTIFACT, what + " names " + quoted(name) + ", a symbolic link; refusing to follow it out of " +
                                       dir);
  return path;
}

Contract load_contract(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    raise(EL_ERR_IO, dir + " is not a directory; give the path of a compiled edgeloop artifact");
  const std::string manifest = dir + "/" + kManifest;
  if (::stat(manifest.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    raise(EL_ERR_IO, dir + " has no " + kManifest + "; it is not a compiled edgeloop artifact");
  std::ifstream in(manifest, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  if (!in.good() && !in.eof()) raise(EL_ERR_IO, "cannot read " + manifest + ": " + std::strerror(errno));
  Contract c = parse_contract(buf.str(), manifest);
  for (const auto& [name, what] : c.referenced_files()) confined_file(dir, name, manifest + " (" + what + ")");
  for (const auto& [name, f] : c.files) confined_file(dir, name, manifest + " (files)");
  return c;
}

void verify_files(const std::string& dir, const Contract& c, const std::set<std::string>& skip) {
  for (const auto& [name, info] : c.files) {
    if (skip.count(name)) continue;
    const std::string path = confined_file(dir, name, dir + "/" + kManifest + " (files)");
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
      raise(EL_ERR_IO, "artifact file " + name + " is missing from " + dir + "; compile the artifact again");
    if (static_cast<int64_t>(st.st_size) != info.bytes)
      raise(EL_ERR_CHECKSUM, "artifact file " + name + " has " + std::to_string(st.st_size) +
                                 " bytes, the manifest says " + std::to_string(info.bytes) +
                                 ": it is truncated or modified; compile the artifact again");
    std::string hex, error;
    if (!sha256_file(path, hex, error)) raise(EL_ERR_IO, "cannot read artifact file " + name + ": " + error);
    if (hex != info.sha256)
      raise(EL_ERR_CHECKSUM, "checksum mismatch for " + name + " in " + dir +
                                 ": the file was modified or corrupted; compile the artifact again");
  }
}

}  // namespace edgeloop
