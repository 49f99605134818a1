// tokenizer_tool: drive edgeloop::Tokenizer over a JSON-lines protocol (one request per line).
//
//   tokenizer_tool path/to/tokenizer.json
//   stdin:  {"encode": "text"}                      -> {"ids": [...]}
//           {"decode": [ids], "skip_special": true}  -> {"text": "..."}   (skip_special defaults to true)
//           {"vocab_size": true}                     -> {"vocab_size": N}
//           {"token_to_id": "tok"}                   -> {"id": N}          (-1 when absent)
//           {"encode_bytes": [b, ...]}               -> {"ids": [...]}     (raw bytes, may be invalid UTF-8)
//           {"time_encode": "text"}                  -> {"ids": [...], "seconds": s}
//   errors: {"error": "..."} (the tool keeps reading); a tokenizer that fails to load prints one
//   error line and exits with status 1.
#include <chrono>
#include <iostream>
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer.h"

using nlohmann::json;

namespace {

// ASCII-only output (non-ASCII as \u escapes) so that every reply is exactly one line.
std::string dump(const json& j) { return j.dump(-1, ' ', true, json::error_handler_t::replace); }

json handle(const edgeloop::Tokenizer& tok, const std::string& line) {
  const json req = json::parse(line);
  if (!req.is_object()) return {{"error", "request must be a JSON object"}};
  if (req.contains("encode")) {
    if (!req["encode"].is_string()) return {{"error", "\"encode\" must be a string"}};
    return {{"ids", tok.encode(req["encode"].get_ref<const std::string&>())}};
  }
  if (req.contains("encode_bytes")) {
    std::string bytes;
    for (const auto& v : req["encode_bytes"]) bytes.push_back(static_cast<char>(v.get<int>()));
    return {{"ids", tok.encode(bytes)}};
  }
  if (req.contains("time_encode")) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto ids = tok.encode(req["time_encode"].get_ref<const std::string&>());
    const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
    return {{"ids", ids}, {"seconds", dt.count()}};
  }
  if (req.contains("decode")) {
    if (!req["decode"].is_array()) return {{"error", "\"decode\" must be an array of ids"}};
    std::vector<int32_t> ids;
    for (const auto& v : req["decode"]) {
      if (!v.is_number_integer()) return {{"error", "\"decode\" must be an array of ids"}};
      const auto id = v.get<int64_t>();
      if (id < INT32_MIN || id > INT32_MAX) return {{"error", "token id out of range"}};
      ids.push_back(static_cast<int32_t>(id));
    }
    const bool skip = req.contains("skip_special") ? req["skip_special"].get<bool>() : true;
    return {{"text", tok.decode(ids, skip)}};
  }
  if (req.contains("vocab_size")) return {{"vocab_size", tok.vocab_size()}};
  if (req.contains("token_to_id")) return {{"id", tok.token_to_id(req["token_to_id"].get<std::string>())}};
  return {{"error", "unknown request (expected \"encode\" or \"decode\")"}};
}

}  // namespace

int main(int argc, char** argv) {
  std::ios::sync_with_stdio(false);
  if (argc != 2) {
    std::cerr << "usage: tokenizer_tool TOKENIZER_JSON < requests.jsonl\n";
    return 2;
  }
  std::unique_ptr<edgeloop::Tokenizer> tok;
  try {
    tok = edgeloop::Tokenizer::from_file(argv[1]);
  } catch (const std::exception& e) {
    std::cout << dump({{"error", e.what()}}) << std::endl;
    return 1;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    if (line.empty()) continue;
    json resp;
    try {
      resp = handle(*tok, line);
    } catch (const std::exception& e) {
      resp = {{"error", e.what()}};
    }
    std::cout << dump(resp) << '\n';
    std::cout.flush();
  }
  return 0;
}
