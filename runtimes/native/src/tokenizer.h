// edgeloop native tokenizer: reads a Hugging Face `tokenizers` tokenizer.json and encodes /
// decodes token-for-token like the Python `tokenizers` library (BPE models only).
//
//   auto tok = edgeloop::Tokenizer::from_file("tokenizer.json");
//   std::vector<int32_t> ids = tok->encode("Hello world");   // == encode(text, add_special_tokens=False).ids
//   std::string text = tok->decode(ids);                      // == decode(ids, skip_special_tokens=True)
//
// Supported components are listed in runtimes/native/README.md; anything else is refused at load
// time with a TokenizerError naming the component's "type".
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace edgeloop {

namespace detail {
struct TokenizerParts;
}

struct TokenizerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Tokenizer {
 public:
  // Throws TokenizerError (missing file, invalid JSON, unsupported component).
  static std::unique_ptr<Tokenizer> from_file(const std::string& path);
  static std::unique_ptr<Tokenizer> from_json(const std::string& json_text);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Same ids as HF `Tokenizer.encode(text, add_special_tokens=False).ids`.
  // Throws TokenizerError if `text` is not valid UTF-8. Thread-safe.
  std::vector<int32_t> encode(std::string_view text) const;

  // Same text as HF `Tokenizer.decode(ids, skip_special_tokens=...)`.
  // Throws TokenizerError on an id that is neither in the vocabulary nor an added token.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const;

  // Id of a vocabulary or added token, -1 when absent.
  int32_t token_to_id(std::string_view token) const;
  // Token string of an id (added tokens included, in the form HF's id_to_token gives);
  // false when absent.
  bool id_to_token(int32_t id, std::string& token) const;
  // == HF get_vocab_size(with_added_tokens=True).
  size_t vocab_size() const;
  // True for ids of added tokens marked "special" (those dropped by skip_special_tokens).
  bool is_special(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  static std::unique_ptr<Tokenizer> from_parts(detail::TokenizerParts&& parts);
  std::unique_ptr<Impl> impl_;
};

}  // namespace edgeloop
