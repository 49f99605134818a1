// edgeloop_native_tests: the native runtime's own tests (run by tests/test_native_runtime.py, and
// under AddressSanitizer + UndefinedBehaviorSanitizer in a -DEDGELOOP_SANITIZE=ON build).
//
//   edgeloop_native_tests units                 SHA-256, the JSON-Schema validator, exit policies, UTF-8
//   edgeloop_native_tests sampler               the sampler's golden sequences (tests/test_sampler.py)
//   edgeloop_native_tests api ARTIFACT SCRATCH  the C API on a real artifact: bad input -> documented
//                                               status codes, streaming, cancel, stop strings, sessions
//   edgeloop_native_tests all ARTIFACT SCRATCH  all three
//   edgeloop_native_tests --dump-golden         the golden table as JSON (checked against Python's)
//
// Prints one line per failed check and a summary; exit status 1 when a check failed.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "contract.h"
#include "edgeloop.h"
#include "error.h"
#include "exits.h"
#include "json_schema.h"
#include "sampler.h"
#include "sha256.h"
#include "text_stream.h"

using nlohmann::json;

namespace {

int g_checks = 0, g_failed = 0;

#define CHECK(cond) check((cond), #cond, __FILE__, __LINE__)
#define CHECK_MSG(cond, msg) check((cond), std::string(#cond) + " | " + (msg), __FILE__, __LINE__)

void check(bool ok, const std::string& what, const char* file, int line) {
  ++g_checks;
  if (!ok) {
    ++g_failed;
    std::printf("FAIL %s:%d: %s\n", file, line, what.c_str());
  }
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// A status and el_last_error() containing `part`.
void expect(el_status got, el_status want, const std::string& part, const char* file, int line) {
  const std::string msg = el_last_error();
  check(got == want, std::string("status ") + el_status_name(got) + " != " + el_status_name(want) + " (" + msg + ")",
        file, line);
  check(part.empty() || contains(msg, part), "message '" + msg + "' lacks '" + part + "'", file, line);
}
#define EXPECT(got, want, part) expect((got), (want), (part), __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------------
// sampler golden sequences: tests/test_sampler.py

const float LOGITS[64] = {
    0x1.0000000000000p+0f, 0x1.0a16320000000p+1f, 0x1.7fd7680000000p+1f, 0x1.d10aae0000000p+1f, 0x1.f239fa0000000p+1f,
    0x1.de40b80000000p+1f, 0x1.97000a0000000p+1f, 0x1.2520260000000p+1f, 0x1.2dcf020000000p+0f, -0x1.b058620000000p-7f,
    -0x1.22cb260000000p+0f, -0x1.0645020000000p+1f, -0x1.5213680000000p+1f, -0x1.6c35ac0000000p+1f, -0x1.52d5dc0000000p+1f,
    -0x1.0b1d960000000p+1f, -0x1.40fb7e0000000p+0f, -0x1.18e6260000000p-2f, 0x1.69792e0000000p-1f, 0x1.8aae7e0000000p+0f,
    0x1.0dc6980000000p+1f, 0x1.2869c00000000p+1f, 0x1.104da80000000p+1f, 0x1.8efcee0000000p+0f, 0x1.5b115a0000000p-1f,
    -0x1.9c4c120000000p-2f, -0x1.8ae5ae0000000p+0f, -0x1.4bcab80000000p+1f, -0x1.b4c6220000000p+1f, -0x1.f263440000000p+1f,
    -0x1.fc4e3c0000000p+1f, -0x1.d101900000000p+1f, -0x1.75fb760000000p+1f, -0x1.ee01440000000p+0f, -0x1.9219000000000p-1f,
    0x1.74308c0000000p-2f, 0x1.5e968e0000000p+0f, 0x1.0d8eb40000000p+1f, 0x1.3de2a60000000p+1f, 0x1.3b2e420000000p+1f,
    0x1.0759a60000000p+1f, 0x1.560e2e0000000p+0f, 0x1.a316b40000000p-2f, -0x1.2b34840000000p-1f, -0x1.7f2c740000000p+0f,
    -0x1.186f220000000p+1f, -0x1.479cc40000000p+1f, -0x1.45134c0000000p+1f, -0x1.0f92120000000p+1f, -0x1.59a7ee0000000p+0f,
    -0x1.466c300000000p-2f, 0x1.afb3aa0000000p-1f, 0x1.fcc3600000000p+0f, 0x1.7bbfac0000000p+1f, 0x1.d3e72c0000000p+1f,
    0x1.fb95f80000000p+1f, 0x1.edeb520000000p+1f, 0x1.ad0f740000000p+1f, 0x1.41e7e40000000p+1f, 0x1.75c5920000000p+0f,
    0x1.5019c60000000p-2f, -0x1.7638760000000p-1f, -0x1.9432b20000000p+0f, -0x1.0dbb600000000p+1f};
const std::vector<int32_t> HISTORY = {3, 5, 5, 60};

struct Golden {
  const char* name;
  double temperature;
  int top_k;
  double top_p, min_p, repetition_penalty;
  uint64_t seed;
  std::vector<int32_t> expected;
};

const std::vector<Golden>& golden() {
  static const std::vector<Golden> g = {
      {"t1", 1.0, 0, 1.0, 0.0, 1.0, 1, {54, 39, 45, 19, 58, 8, 8, 12, 62, 14, 51, 51, 50, 18, 18, 38}},
      {"t07_k10", 0.7, 10, 1.0, 0.0, 1.0, 2, {3, 56, 6, 58, 59, 9, 61, 11, 13, 14, 14, 3, 16, 19, 20, 5}},
      {"p09", 1.2, 0, 0.9, 0.0, 1.0, 3, {54, 55, 6, 42, 25, 24, 10, 60, 63, 2, 50, 16, 16, 19, 19, 5}},
      {"minp", 1.0, 0, 1.0, 0.1, 1.0, 4, {5, 57, 23, 61, 8, 58, 28, 61, 0, 11, 0, 50, 14, 17, 19, 8}},
      {"all", 0.9, 20, 0.8, 0.05, 1.3, 5, {5, 56, 57, 59, 10, 61, 12, 62, 11, 2, 63, 2, 5, 17, 17, 20}},
      {"bigseed", 1.0, 0, 1.0, 0.0, 1.0, 18446744073709551615ULL,
       {40, 56, 40, 58, 45, 60, 12, 61, 29, 15, 2, 1, 15, 15, 5, 21}},
  };
  return g;
}

std::vector<float> rolled(const float* logits, int shift) {  // np.roll(LOGITS, shift)
  std::vector<float> out(64);
  for (int i = 0; i < 64; ++i) out[(i + shift) % 64] = logits[i];
  return out;
}

el_generation_params params_of(const Golden& g) {
  el_generation_params p = el_generation_default_params(nullptr);
  p.temperature = g.temperature;
  p.top_k = g.top_k;
  p.top_p = g.top_p;
  p.min_p = g.min_p;
  p.repetition_penalty = g.repetition_penalty;
  p.seed = g.seed;
  p.has_seed = true;
  return p;
}

std::vector<int32_t> draws(const el_generation_params& p) {  // 16 draws, the history growing
  el_sampler* s = nullptr;
  if (el_sampler_create(&p, &s) != EL_OK) return {};
  std::vector<int32_t> history = HISTORY, out;
  for (int i = 0; i < 16; ++i) {
    const auto logits = rolled(LOGITS, i);
    const el_token t = el_sampler_sample(s, logits.data(), 64, history.data(), history.size());
    out.push_back(t);
    history.push_back(t);
  }
  el_sampler_free(s);
  return out;
}

void dump_golden() {
  json out = json::object();
  for (const auto& g : golden())
    out[g.name] = {{"temperature", g.temperature}, {"top_k", g.top_k}, {"top_p", g.top_p}, {"min_p", g.min_p},
                   {"repetition_penalty", g.repetition_penalty}, {"seed", g.seed}, {"expected", g.expected}};
  std::vector<float> logits(LOGITS, LOGITS + 64);
  out["_logits"] = logits;
  std::printf("%s\n", out.dump().c_str());
}

void test_sampler() {
  // reference values (docs/sampling.md)
  uint64_t state = 0;
  CHECK(edgeloop::splitmix64(state) == 0xE220A8397B1DCDAFULL);
  CHECK(edgeloop::splitmix64(state) == 0x6E789E6AA1B965F4ULL);
  edgeloop::Xoshiro256 rng(0);
  CHECK(rng.next_u64() == 0x99EC5F36CB75F2B4ULL);
  CHECK(rng.next_u64() == 0xBF6E1F784956452AULL);
  CHECK(rng.next_u64() == 0x1A5F849D4933E6E0ULL);
  edgeloop::Xoshiro256 r2(12345);
  CHECK(r2.uniform() == 0.7438081631565894);
  CHECK(r2.uniform() == 0.13004553462783452);

  for (const auto& g : golden()) {
    const auto got = draws(params_of(g));
    std::string s;
    for (auto t : got) s += std::to_string(t) + " ";
    CHECK_MSG(got == g.expected, std::string("golden ") + g.name + ": got " + s);
  }
  // greedy: the first index of the maximum, no random number drawn
  el_generation_params greedy = el_generation_default_params(nullptr);
  const auto got = draws(greedy);
  for (int i = 0; i < 16 && got.size() == 16; ++i) {
    const auto logits = rolled(LOGITS, i);
    CHECK(got[i] == std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  // the filters (tests/test_sampler.py test_greedy_and_filters)
  const float small[4] = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  const auto seen = [&](std::function<void(el_generation_params&)> set) {
    std::set<int32_t> out;
    for (uint64_t seed = 0; seed < 300; ++seed) {
      el_generation_params p = el_generation_default_params(nullptr);
      p.temperature = 1.0;
      p.seed = seed;
      p.has_seed = true;
      set(p);
      el_sampler* s = nullptr;
      el_sampler_create(&p, &s);
      out.insert(el_sampler_sample(s, small, 4, nullptr, 0));
      el_sampler_free(s);
    }
    return out;
  };
  CHECK((seen([](el_generation_params& p) { p.top_k = 2; }) == std::set<int32_t>{0, 1}));
  CHECK((seen([](el_generation_params& p) { p.top_p = 0.7; }) == std::set<int32_t>{0, 1}));
  CHECK((seen([](el_generation_params& p) { p.min_p = 0.5; }) == std::set<int32_t>{0, 1}));
  CHECK((seen([](el_generation_params&) {}) == std::set<int32_t>{0, 1, 2, 3}));
  {
    el_generation_params p = el_generation_default_params(nullptr);
    p.repetition_penalty = 100.0;
    el_sampler* s = nullptr;
    el_sampler_create(&p, &s);
    const float three[3] = {3.0f, 2.0f, 1.0f};
    const el_token history[1] = {0};
    CHECK(el_sampler_sample(s, three, 3, history, 1) == 1);
    const float nan3[3] = {1.0f, NAN, 0.0f};
    EXPECT(static_cast<el_status>(-el_sampler_sample(s, nan3, 3, nullptr, 0)), EL_ERR_INVALID_ARGUMENT, "non-finite");
    const el_token bad[1] = {7};
    EXPECT(static_cast<el_status>(-el_sampler_sample(s, three, 3, bad, 1)), EL_ERR_INVALID_ARGUMENT, "history");
    el_sampler_free(s);
  }
  std::set<int32_t> ties;  // top_k ties: exactly k tokens, lower ids first
  const float flat[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (uint64_t seed = 0; seed < 200; ++seed) {
    el_generation_params p = el_generation_default_params(nullptr);
    p.temperature = 1.0, p.top_k = 3, p.seed = seed, p.has_seed = true;
    el_sampler* s = nullptr;
    el_sampler_create(&p, &s);
    ties.insert(el_sampler_sample(s, flat, 8, nullptr, 0));
    el_sampler_free(s);
  }
  CHECK((ties == std::set<int32_t>{0, 1, 2}));
  // unseeded samplers report the random seed they drew
  el_generation_params p = el_generation_default_params(nullptr);
  el_sampler* a = nullptr;
  el_sampler* b = nullptr;
  el_sampler_create(&p, &a);
  el_sampler_create(&p, &b);
  CHECK(el_sampler_seed(a) != el_sampler_seed(b));
  el_sampler_free(a);
  el_sampler_free(b);
}

// ---------------------------------------------------------------------------------------------
// units

void test_units() {
  using edgeloop::Sha256;
  CHECK(Sha256::hex_of("", 0) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  CHECK(Sha256::hex_of("abc", 3) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK(Sha256::hex_of(two.data(), two.size()) == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  {
    Sha256 h;  // a million 'a', fed in uneven pieces
    const std::string chunk(997, 'a');
    size_t left = 1000000;
    while (left) {
      const size_t n = std::min(left, chunk.size());
      h.update(chunk.data(), n);
      left -= n;
    }
    CHECK(Sha256::hex(h.finish()) == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  }
  for (size_t n : {55, 56, 63, 64, 65, 119, 120}) {  // padding boundaries: one update == byte-wise updates
    const std::string s(n, 'x');
    Sha256 h;
    for (char c : s) h.update(&c, 1);
    CHECK(Sha256::hex(h.finish()) == Sha256::hex_of(s.data(), s.size()));
  }

  // the JSON-Schema subset
  const json schema = json::parse(R"({
    "$defs": {"Item": {"type": "object", "additionalProperties": false,
                       "properties": {"id": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
                       "required": ["id"]}},
    "type": "object", "additionalProperties": false, "required": ["items", "name"],
    "properties": {
      "name": {"type": "string"},
      "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
      "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2,
               "maxItems": 2},
      "maybe": {"anyOf": [{"type": "number"}, {"type": "null"}]},
      "fmt": {"const": "x"},
      "extra": {"type": "object", "additionalProperties": {"type": "boolean"}}
    }})");
  const edgeloop::SchemaValidator v(schema);
  const auto bad = [&](const char* text) { return v.validate(json::parse(text)); };
  CHECK(bad(R"({"name": "n", "items": [{"id": 1, "tag": "a"}], "pair": [1, "s"], "maybe": null, "fmt": "x",
               "extra": {"k": true}})") == "");
  CHECK(bad(R"({"name": "n", "items": [], "maybe": 2.5})") == "");
  CHECK(contains(bad(R"({"name": "n"})"), "field items: field required"));
  CHECK(contains(bad(R"({"name": 3, "items": []})"), "field name: input should be a valid string (got 3)"));
  CHECK(contains(bad(R"({"name": "n", "items": [{"id": 1.5}]})"), "field items.0.id: input should be a valid integer"));
  CHECK(contains(bad(R"({"name": "n", "items": [{"id": 1, "tag": "c"}]})"), "field items.0.tag"));
  CHECK(contains(bad(R"({"name": "n", "items": [{"id": 1, "x": 0}]})"), "items.0.x: extra inputs are not permitted"));
  CHECK(contains(bad(R"({"name": "n", "items": [], "pair": [1, 2]})"), "field pair.1"));
  CHECK(contains(bad(R"({"name": "n", "items": [], "pair": [1]})"), "at least 2"));
  CHECK(contains(bad(R"({"name": "n", "items": [], "maybe": "s"})"), "field maybe: input should be a valid number"));
  CHECK(contains(bad(R"({"name": "n", "items": [], "fmt": "y"})"), "field fmt"));
  CHECK(contains(bad(R"({"name": "n", "items": [], "extra": {"k": 1}})"), "field extra.k"));
  CHECK(contains(bad(R"([1])"), "(top level)"));
  // the embedded artifact schema parses and names the manifest's sections
  const json artifact_schema = json::parse(edgeloop::embedded_schema());
  CHECK(artifact_schema.contains("$defs") && artifact_schema["$defs"].contains("TensorSpec"));

  // exit policies (runtimes/exits.py parse_policy)
  using edgeloop::parse_exit_policy;
  CHECK(parse_exit_policy("none", 4, false, {}).kind == "none");
  CHECK(parse_exit_policy("", 4, false, {}).kind == "none");
  CHECK(parse_exit_policy("confidence:0.9", 4, false, {}).str() == "confidence:0.9");
  CHECK(parse_exit_policy(" Agreement ", 4, false, {}).str() == "agreement:1");
  CHECK(parse_exit_policy("depth:2", 4, false, {}).count == 2);
  CHECK(parse_exit_policy("gate", 4, true, 0.7).threshold == 0.7);
  CHECK(parse_exit_policy("kl:0.01", 4, false, {}).str() == "kl:0.01");
  CHECK(parse_exit_policy("speculate:1x4", 4, false, {}).draft_depth == 1);
  for (const char* badp : {"confidence:2", "confidence:x", "confidence", "depth:5", "depth:0", "agreement:4", "bogus",
                           "gate", "entropy:-1", "speculate:4x1", "speculate:1"}) {
    bool threw = false;
    try {
      parse_exit_policy(badp, 4, false, {});
    } catch (const edgeloop::Error& e) {
      threw = e.status == EL_ERR_INVALID_ARGUMENT && contains(e.what(), "exit policy");
    }
    CHECK_MSG(threw, badp);
  }
  // numpy's pairwise sum: exact for these, and the block structure for long inputs
  std::vector<double> ones(1000, 1.0);
  CHECK(edgeloop::pairwise_sum(ones.data(), ones.size()) == 1000.0);
  std::vector<double> tiny = {1e16, 1.0, -1e16, 1.0};  // n < 8: sequential left to right
  CHECK(edgeloop::pairwise_sum(tiny.data(), tiny.size()) == 1.0);

  // UTF-8 helpers
  const std::string s = "a\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80";  // a é € 😀
  CHECK(edgeloop::utf8_length(s) == 4);
  CHECK(edgeloop::utf8_offset(s, 2) == 3);
  CHECK(edgeloop::utf8_offset(s, 9) == s.size());
}

// ---------------------------------------------------------------------------------------------
// the C API on an artifact

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

void remove_tree(const std::string& dir) {
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") unlink((dir + "/" + name).c_str());
    }
    closedir(d);
  }
  rmdir(dir.c_str());
}

// A copy of the artifact in scratch/name: hard links for what is not changed, copies otherwise.
std::string clone(const std::string& artifact, const std::string& scratch, const std::string& name,
                  const std::set<std::string>& copies = {}) {
  const std::string dir = scratch + "/" + name;
  remove_tree(dir);
  mkdir(dir.c_str(), 0755);
  DIR* d = opendir(artifact.c_str());
  while (dirent* e = readdir(d)) {
    const std::string f = e->d_name;
    if (f == "." || f == "..") continue;
    const std::string src = artifact + "/" + f, dst = dir + "/" + f;
    if (copies.count(f) || f == edgeloop::kManifest || link(src.c_str(), dst.c_str()) != 0) write_file(dst, read_file(src));
  }
  closedir(d);
  return dir;
}

// Rewrite the manifest through `edit`, with a correct digest unless `keep_digest`.
void edit_manifest(const std::string& dir, const std::function<void(json&)>& edit, bool fix_digest = true) {
  json m = json::parse(read_file(dir + "/" + edgeloop::kManifest));
  edit(m);
  if (m.contains("manifest_sha256")) m["manifest_sha256"] = std::string(64, '0');
  std::string raw = m.dump(2) + "\n";
  if (fix_digest && m.contains("manifest_sha256")) {
    const std::string digest = edgeloop::manifest_digest(raw);
    const std::string zero = "\"manifest_sha256\": \"" + std::string(64, '0') + "\"";
    raw.replace(raw.find(zero), zero.size(), "\"manifest_sha256\": \"" + digest + "\"");
  }
  write_file(dir + "/" + edgeloop::kManifest, raw);
}

void refresh_checksum(const std::string& dir, const std::string& file) {
  const std::string data = read_file(dir + "/" + file);
  edit_manifest(dir, [&](json& m) {
    m["files"][file]["sha256"] = edgeloop::Sha256::hex_of(data.data(), data.size());
    m["files"][file]["bytes"] = data.size();
  });
}

el_status load(const std::string& dir, el_model** out = nullptr) {
  el_model* model = nullptr;
  const el_status st = el_model_load(dir.c_str(), el_model_default_params(), &model);
  if (out) *out = model;
  else el_model_free(model);
  return st;
}

void test_bad_artifacts(const std::string& artifact, const std::string& scratch) {
  el_model* model = reinterpret_cast<el_model*>(1);
  EXPECT(el_model_load((scratch + "/nowhere").c_str(), el_model_default_params(), &model), EL_ERR_IO, "not a directory");
  CHECK(model == nullptr);
  EXPECT(el_model_load(nullptr, el_model_default_params(), &model), EL_ERR_INVALID_ARGUMENT, "path");
  EXPECT(el_model_load(artifact.c_str(), el_model_default_params(), nullptr), EL_ERR_INVALID_ARGUMENT, "out_model");

  std::string d = clone(artifact, scratch, "no-manifest");
  unlink((d + "/edgeloop.json").c_str());
  EXPECT(load(d), EL_ERR_IO, "has no edgeloop.json");

  d = clone(artifact, scratch, "not-json");
  write_file(d + "/edgeloop.json", "{\"format\": \"edgeloop-artifact\", ");
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "not valid JSON");

  d = clone(artifact, scratch, "not-manifest");
  write_file(d + "/edgeloop.json", "[1, 2]");
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "not an edgeloop artifact manifest");

  d = clone(artifact, scratch, "old-version");
  edit_manifest(d, [](json& m) { m["version"] = 1; });
  EXPECT(load(d), EL_ERR_VERSION, "compiled by an older edgeloop (artifact format 1, this edgeloop reads 2): compile it again");

  d = clone(artifact, scratch, "new-version");
  edit_manifest(d, [](json& m) { m["version"] = 3; });
  EXPECT(load(d), EL_ERR_VERSION, "needs a newer edgeloop");

  d = clone(artifact, scratch, "edited");
  {
    std::string raw = read_file(d + "/edgeloop.json");
    const size_t at = raw.find("\"max_context\": ");
    raw.replace(at, std::strlen("\"max_context\": "), "\"max_context\":  ");  // one byte more, digest kept
    write_file(d + "/edgeloop.json", raw);
  }
  EXPECT(load(d), EL_ERR_CHECKSUM, "modified after compilation");

  d = clone(artifact, scratch, "no-digest");
  edit_manifest(d, [](json& m) { m.erase("manifest_sha256"); });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "no manifest digest");

  d = clone(artifact, scratch, "schema-type");
  edit_manifest(d, [](json& m) { m["loop"]["host_loop"] = "yes"; });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "does not match the artifact schema: field loop.host_loop: input should be a valid boolean");

  d = clone(artifact, scratch, "schema-extra");
  edit_manifest(d, [](json& m) { m["kv"]["surprise"] = 1; });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "field kv.surprise: extra inputs are not permitted");

  d = clone(artifact, scratch, "schema-required");
  edit_manifest(d, [](json& m) { m["entry_points"]["forward"].erase("symbol"); });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "field entry_points.forward.symbol: field required");

  d = clone(artifact, scratch, "inconsistent");
  edit_manifest(d, [](json& m) { m["loop"]["loops"] = 3; });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "disagree");

  d = clone(artifact, scratch, "unlisted");
  edit_manifest(d, [](json& m) { m["files"].erase("params.bin"); });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "tvm.params names 'params.bin', which the manifest's files do not list");

  d = clone(artifact, scratch, "outside");
  edit_manifest(d, [](json& m) {
    m["tvm"]["params"] = "../params.bin";
    m["files"]["../params.bin"] = m["files"]["params.bin"];
  });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "'../params.bin', which is not a plain file name inside");

  d = clone(artifact, scratch, "absolute");
  edit_manifest(d, [](json& m) { m["files"]["/etc/passwd"] = m["files"]["params.bin"]; });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "not a plain file name");

  d = clone(artifact, scratch, "hidden");
  edit_manifest(d, [](json& m) { m["files"][".secret"] = m["files"]["params.bin"]; });
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "'.secret', which is not a plain file name");

  d = clone(artifact, scratch, "symlink");
  unlink((d + "/tokenizer.json").c_str());
  CHECK(symlink((artifact + "/tokenizer.json").c_str(), (d + "/tokenizer.json").c_str()) == 0);
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "a symbolic link");

  d = clone(artifact, scratch, "flipped", {"params.bin"});
  {
    std::string p = read_file(d + "/params.bin");
    p[p.size() / 2] ^= 0x40;
    write_file(d + "/params.bin", p);
  }
  EXPECT(load(d), EL_ERR_CHECKSUM, "checksum mismatch for params.bin");

  d = clone(artifact, scratch, "truncated", {"params.bin"});
  {
    std::string p = read_file(d + "/params.bin");
    write_file(d + "/params.bin", p.substr(0, p.size() - 10));
  }
  EXPECT(load(d), EL_ERR_CHECKSUM, "truncated or modified");

  d = clone(artifact, scratch, "missing-file");
  unlink((d + "/params.bin").c_str());
  EXPECT(load(d), EL_ERR_IO, "params.bin is missing");

  d = clone(artifact, scratch, "bad-tokenizer", {"tokenizer.json"});
  write_file(d + "/tokenizer.json", "{\"model\": {\"type\": \"Unigram\"}}");
  refresh_checksum(d, "tokenizer.json");
  EXPECT(load(d), EL_ERR_CORRUPT_ARTIFACT, "cannot load the tokenizer");

  d = clone(artifact, scratch, "bad-library", {"model.so"});
  write_file(d + "/model.so", "this is not a shared library");
  refresh_checksum(d, "model.so");
  EXPECT(load(d), EL_ERR_TVM, "TVM cannot load");

  d = clone(artifact, scratch, "bad-params", {"params.bin"});
  write_file(d + "/params.bin", "garbage");
  refresh_checksum(d, "params.bin");
  {
    const el_status st = load(d);
    CHECK_MSG(st == EL_ERR_TVM || st == EL_ERR_CORRUPT_ARTIFACT, el_last_error());
  }

  d = clone(artifact, scratch, "gpu-target");
  edit_manifest(d, [](json& m) { m["tvm"]["device"] = "metal"; m["target"] = "ios-metal"; });
  EXPECT(load(d), EL_ERR_UNSUPPORTED, "runs CPU artifacts");

  d = clone(artifact, scratch, "tar");
  edit_manifest(d, [](json& m) {
    m["tvm"]["library"] = "model.tar";
    m["files"]["model.tar"] = m["files"]["model.so"];
    m["files"].erase("model.so");
  });
  EXPECT(load(d), EL_ERR_UNSUPPORTED, "library_path");
  {  // ... which loads with the library linked from it (here: the original model.so)
    el_model_params mp = el_model_default_params();
    const std::string lib = artifact + "/model.so";
    mp.library_path = lib.c_str();
    el_model* m = nullptr;
    EXPECT(el_model_load(d.c_str(), mp, &m), EL_OK, "");
    el_model_free(m);
  }
  el_model_free(nullptr);
  el_session_free(nullptr);
  el_sampler_free(nullptr);
  el_detokenizer_free(nullptr);
}

struct Collected {
  std::vector<el_token> tokens;
  std::string text;
  int cancel_after = -1;
};

int collect(el_token token, const char* piece, size_t len, void* user) {
  auto* c = static_cast<Collected*>(user);
  if (token != EL_TOKEN_NONE) c->tokens.push_back(token);
  c->text.append(piece, len);
  return c->cancel_after >= 0 && static_cast<int>(c->tokens.size()) >= c->cancel_after;
}

void log_sink(el_log_level, const char* message, void* user) { static_cast<std::vector<std::string>*>(user)->push_back(message); }

void test_api(const std::string& artifact) {
  std::vector<std::string> logs;
  el_set_log_callback(log_sink, &logs);
  el_model* model = nullptr;
  EXPECT(load(artifact, &model), EL_OK, "");
  el_set_log_callback(nullptr, nullptr);
  if (!model) return;
  CHECK(!logs.empty() && contains(logs[0], "loaded"));
  const int32_t vocab = el_model_n_vocab(model), n_ctx = el_model_n_ctx(model);
  CHECK(vocab == 4096 && n_ctx == 2048 && el_model_n_loops(model) == 4);
  CHECK(el_model_has_host_loop(model) && el_model_has_tokenizer(model));
  CHECK(el_model_bos(model) == 0 && el_model_is_eos(model, 0) && !el_model_is_eos(model, 5));
  char small[4];
  CHECK(el_model_exit_policy(model, small, sizeof(small)) == 4 && std::string(small) == "non");
  CHECK(std::string(el_version()).find("artifact format 2") != std::string::npos);
  CHECK(std::string(el_finish_reason_name(EL_FINISH_EOS)) == "eos");
  CHECK(std::string(el_finish_reason_name(EL_FINISH_CANCELLED)) == "cancelled");
  CHECK(std::string(el_finish_reason_name(EL_FINISH_NONE)).empty());
  CHECK(std::string(el_finish_reason_name(static_cast<el_finish_reason>(99))).empty());

  // tokens: sizes reported, buffers never overrun
  const std::string prompt = "And God said unto Moses";
  const int32_t n = el_tokenize(model, prompt.data(), prompt.size(), true, nullptr, 0);
  CHECK(n > 0);
  std::vector<el_token> ids(n);
  CHECK(el_tokenize(model, prompt.data(), prompt.size(), true, ids.data(), n) == n);
  el_token two[2] = {-7, -7};
  CHECK(el_tokenize(model, prompt.data(), prompt.size(), true, two, 1) == n && two[1] == -7);
  const int32_t len = el_detokenize(model, ids.data(), n, true, nullptr, 0);
  CHECK(len == static_cast<int32_t>(prompt.size()));
  std::string back(len, '\0');
  CHECK(el_detokenize(model, ids.data(), n, true, &back[0], back.size() + 1) == len && back == prompt);
  char tiny[3] = {'x', 'x', 'x'};
  CHECK(el_detokenize(model, ids.data(), n, true, tiny, 2) == len && tiny[1] == '\0' && tiny[2] == 'x');
  const int32_t piece = el_token_to_piece(model, ids[0], nullptr, 0);
  CHECK(piece > 0);
  const std::string invalid = "ok \xC3\x28";
  EXPECT(static_cast<el_status>(-el_tokenize(model, invalid.data(), invalid.size(), true, nullptr, 0)),
         EL_ERR_INVALID_ARGUMENT, "UTF-8");
  const el_token out_of_range = 999999;
  EXPECT(static_cast<el_status>(-el_detokenize(model, &out_of_range, 1, true, nullptr, 0)), EL_ERR_INVALID_ARGUMENT, "");
  EXPECT(static_cast<el_status>(-el_tokenize(nullptr, "a", 1, true, nullptr, 0)), EL_ERR_INVALID_ARGUMENT, "NULL");

  // sessions: policies
  el_session* s = nullptr;
  el_session_params sp = el_session_default_params();
  for (const char* bad : {"confidence:2", "bogus:1", "depth:9", "gate"}) {
    sp.exit_policy = bad;
    EXPECT(el_session_create(model, sp, &s), EL_ERR_INVALID_ARGUMENT, "exit policy");
    CHECK(s == nullptr);
  }
  sp.exit_policy = "speculate:1x4";
  EXPECT(el_session_create(model, sp, &s), EL_ERR_UNSUPPORTED, "speculat");
  sp = el_session_default_params();
  sp.max_loops = -1;
  EXPECT(el_session_create(model, sp, &s), EL_ERR_INVALID_ARGUMENT, "max_loops");
  sp = el_session_default_params();
  EXPECT(el_session_create(model, sp, &s), EL_OK, "");
  if (!s) {
    el_model_free(model);
    return;
  }

  // invalid generation options: EL_ERR_INVALID_ARGUMENT naming the option, nothing generated
  const auto bad_option = [&](const char* field, std::function<void(el_generation_params&)> set) {
    el_generation_params p = el_generation_default_params(model);
    set(p);
    Collected c;
    EXPECT(el_generate(s, prompt.c_str(), &p, collect, &c, nullptr), EL_ERR_INVALID_ARGUMENT, field);
    CHECK(c.tokens.empty());
    EXPECT(el_generation_params_check(&p), EL_ERR_INVALID_ARGUMENT, field);
  };
  bad_option("temperature", [](el_generation_params& p) { p.temperature = NAN; });
  bad_option("temperature", [](el_generation_params& p) { p.temperature = -1; });
  bad_option("temperature", [](el_generation_params& p) { p.temperature = INFINITY; });
  bad_option("too small", [](el_generation_params& p) { p.temperature = 1e-4; });
  bad_option("top_p", [](el_generation_params& p) { p.top_p = 0; });
  bad_option("top_p", [](el_generation_params& p) { p.top_p = 1.5; });
  bad_option("min_p", [](el_generation_params& p) { p.min_p = 1; });
  bad_option("repetition_penalty", [](el_generation_params& p) { p.repetition_penalty = 0; });
  bad_option("repetition_penalty", [](el_generation_params& p) { p.repetition_penalty = NAN; });
  bad_option("top_k", [](el_generation_params& p) { p.top_k = -1; });
  bad_option("max_new_tokens", [](el_generation_params& p) { p.max_new_tokens = -1; });
  bad_option("stop", [](el_generation_params& p) { p.n_stop = 1; });
  EXPECT(el_generate(s, nullptr, nullptr, nullptr, nullptr, nullptr), EL_ERR_INVALID_ARGUMENT, "NULL");

  // greedy generation, streamed: pieces concatenate to the text, tokens as reported
  el_generation_params gp = el_generation_default_params(model);
  gp.max_new_tokens = 24;
  gp.ignore_eos = true;
  Collected c;
  el_generation_result r;
  EXPECT(el_generate(s, prompt.c_str(), &gp, collect, &c, &r), EL_OK, "");
  CHECK(r.finish_reason == EL_FINISH_LENGTH && r.n_generated == 24 && r.n_prompt_tokens == n);
  CHECK(r.mean_loops == 4.0 && r.prefill_seconds > 0);
  std::vector<el_token> tokens(24);
  std::vector<int32_t> depths(24);
  CHECK(el_session_tokens(s, tokens.data(), depths.data(), 24) == 24 && tokens == c.tokens);
  std::string text(static_cast<size_t>(el_session_text(s, nullptr, 0)), '\0');
  el_session_text(s, &text[0], text.size() + 1);
  CHECK(text == c.text && !text.empty());
  CHECK(el_session_n_past(s) == n + 23);
  const std::string full = text;
  const std::vector<el_token> greedy = tokens;

  // the incremental detokenizer gives the same text, one token at a time
  el_detokenizer* dt = nullptr;
  EXPECT(el_detokenizer_create(model, &dt), EL_OK, "");
  std::string streamed;
  for (el_token t : greedy) {
    const char* p = nullptr;
    size_t pl = 0;
    CHECK(el_detokenizer_push(dt, t, &p, &pl) == EL_OK);
    streamed.append(p, pl);
  }
  const char* p = nullptr;
  size_t pl = 0;
  CHECK(el_detokenizer_flush(dt, &p, &pl) == EL_OK);
  streamed.append(p, pl);
  CHECK(streamed == full);
  EXPECT(el_detokenizer_push(dt, 999999, &p, &pl), EL_ERR_INVALID_ARGUMENT, "vocabulary");
  el_detokenizer_free(dt);

  // token level: decode the prompt (all logits), then feed greedy tokens; matches el_generate
  EXPECT(el_session_rewind(s, 0), EL_OK, "");
  CHECK(el_session_n_past(s) == 0);
  std::vector<float> all(static_cast<size_t>(n) * vocab);
  int32_t depth = 0;
  EXPECT(el_session_decode(s, ids.data(), n, true, all.data(), all.size(), &depth), EL_OK, "");
  CHECK(depth == 4 && el_session_n_past(s) == n);
  std::vector<float> last(all.end() - vocab, all.end());
  for (int i = 0; i < 4; ++i) {
    const el_token t = static_cast<el_token>(std::max_element(last.begin(), last.end()) - last.begin());
    CHECK(t == greedy[i]);
    EXPECT(el_session_decode(s, &t, 1, false, last.data(), last.size(), nullptr), EL_OK, "");
  }
  const int32_t past = el_session_n_past(s);
  EXPECT(el_session_decode(s, ids.data(), 1, false, last.data(), vocab - 1, nullptr), EL_ERR_INVALID_ARGUMENT, "too small");
  const el_token oob = vocab;
  EXPECT(el_session_decode(s, &oob, 1, false, nullptr, 0, nullptr), EL_ERR_INVALID_ARGUMENT, "outside the vocabulary");
  CHECK(el_session_n_past(s) == past);

  // stop strings: the text ends before the first stop string, which is held back meanwhile
  const size_t cut = full.find("LORD");
  if (cut != std::string::npos) {
    el_generation_params sp2 = gp;
    const char* stops[] = {"LORD"};
    sp2.stop = stops;
    sp2.n_stop = 1;
    Collected cs;
    EXPECT(el_generate(s, prompt.c_str(), &sp2, collect, &cs, &r), EL_OK, "");
    CHECK(r.finish_reason == EL_FINISH_STOP && cs.text == full.substr(0, cut));
  }

  // cancel from the callback: EL_ERR_CANCELLED, the output so far kept, the session still usable
  Collected cc;
  cc.cancel_after = 3;
  EXPECT(el_generate(s, prompt.c_str(), &gp, collect, &cc, &r), EL_ERR_CANCELLED, "cancelled");
  CHECK(r.finish_reason == EL_FINISH_CANCELLED && r.n_generated == 3 && el_session_tokens(s, nullptr, nullptr, 0) == 3);
  Collected again;
  EXPECT(el_generate(s, prompt.c_str(), &gp, collect, &again, &r), EL_OK, "");
  CHECK(again.tokens == greedy);

  // reuse_prefix: a longer prompt that starts with the cached one gives the same tokens as fresh
  el_generation_params reuse = gp;
  reuse.reuse_prefix = true;
  reuse.max_new_tokens = 8;
  const std::string longer = prompt + full;
  Collected fresh, reused;
  EXPECT(el_generate(s, longer.c_str(), &gp, collect, &fresh, nullptr), EL_OK, "");
  EXPECT(el_generate(s, prompt.c_str(), &gp, nullptr, nullptr, nullptr), EL_OK, "");
  EXPECT(el_generate(s, longer.c_str(), &reuse, collect, &reused, nullptr), EL_OK, "");
  CHECK(std::vector<el_token>(fresh.tokens.begin(), fresh.tokens.begin() + 8) == reused.tokens);

  // the context: a prompt of n_ctx tokens is refused (nothing changed) unless truncate
  std::vector<el_token> huge(static_cast<size_t>(n_ctx));
  for (size_t i = 0; i < huge.size(); ++i) huge[i] = ids[i % ids.size()];
  EXPECT(el_generate_tokens(s, huge.data(), static_cast<int32_t>(huge.size()), &gp, nullptr, nullptr, &r),
         EL_ERR_CONTEXT_FULL, "the context holds 2048");
  el_generation_params trunc = gp;
  trunc.truncate = true;
  trunc.max_new_tokens = 2;
  EXPECT(el_generate_tokens(s, huge.data(), static_cast<int32_t>(huge.size()), &trunc, nullptr, nullptr, &r), EL_OK, "");
  CHECK(r.n_dropped_tokens == 2 && r.n_prompt_tokens == n_ctx - 2 && r.n_generated == 2);
  CHECK(r.finish_reason == EL_FINISH_LENGTH);
  EXPECT(el_session_decode(s, huge.data(), 3, false, nullptr, 0, nullptr), EL_ERR_CONTEXT_FULL, "exceed");
  el_session_free(s);

  // early exit: depth:2 runs the prompt at full depth, then 2 passes per token
  sp.exit_policy = "depth:2";
  EXPECT(el_session_create(model, sp, &s), EL_OK, "");
  if (s) {
    char policy[64];
    el_session_exit_policy(s, policy, sizeof(policy));
    CHECK(std::string(policy) == "depth:2");
    gp.max_new_tokens = 6;
    EXPECT(el_generate(s, prompt.c_str(), &gp, nullptr, nullptr, &r), EL_OK, "");
    std::vector<int32_t> dd(6);
    el_session_tokens(s, nullptr, dd.data(), 6);
    CHECK((dd == std::vector<int32_t>{4, 2, 2, 2, 2, 2}));
    // token-level host-driven decoding; rewind removes every depth's entries
    EXPECT(el_session_rewind(s, 2), EL_OK, "");
    CHECK(el_session_n_past(s) == 2);
    EXPECT(el_session_decode(s, ids.data() + 2, n - 2, false, last.data(), last.size(), &depth), EL_OK, "");
    CHECK(depth == 4);
    const el_token t = static_cast<el_token>(std::max_element(last.begin(), last.end()) - last.begin());
    CHECK(t == greedy[0]);
    EXPECT(el_session_decode(s, &t, 1, false, last.data(), last.size(), &depth), EL_OK, "");
    CHECK(depth == 2);
    el_session_free(s);
  }
  sp.exit_policy = "none";
  sp.max_loops = 1;
  EXPECT(el_session_create(model, sp, &s), EL_OK, "");
  if (s) {
    EXPECT(el_generate(s, prompt.c_str(), &gp, nullptr, nullptr, &r), EL_OK, "");
    CHECK(r.mean_loops == 1.0);
    el_session_free(s);
  }
  el_model_free(model);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "--dump-golden") {
    dump_golden();
    return 0;
  }
  const bool all = mode == "all";
  if (mode != "units" && mode != "sampler" && mode != "api" && !all) {
    std::fprintf(stderr, "usage: edgeloop_native_tests units|sampler|api ARTIFACT SCRATCH|all ARTIFACT SCRATCH|--dump-golden\n");
    return 2;
  }
  if (all || mode == "units") test_units();
  if (all || mode == "sampler") test_sampler();
  if (all || mode == "api") {
    if (argc < 4) {
      std::fprintf(stderr, "api needs ARTIFACT and SCRATCH\n");
      return 2;
    }
    test_bad_artifacts(argv[2], argv[3]);
    test_api(argv[2]);
  }
  std::printf("%d checks, %d failed\n", g_checks, g_failed);
  return g_failed ? 1 : 0;
}
