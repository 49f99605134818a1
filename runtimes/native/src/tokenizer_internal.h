// Internal pieces of the edgeloop tokenizer (not part of the public API).
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer.h"

namespace edgeloop::detail {

[[noreturn]] void fail(const std::string& message);  // throws TokenizerError

// ---------------------------------------------------------------- unicode.cpp
bool utf8_valid(std::string_view s);
// Length of the UTF-8 sequence starting with `lead` (1 for invalid leads).
size_t utf8_len(unsigned char lead);
// Decodes the code point at s[i] (valid UTF-8 assumed) and advances i.
char32_t utf8_next(std::string_view s, size_t& i);
void utf8_append(std::string& out, char32_t cp);
std::vector<char32_t> utf8_decode(std::string_view s);
// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string utf8_lossy(std::string_view bytes);

enum class NormForm { NFC, NFD, NFKC, NFKD };
std::string unicode_normalize(std::string_view s, NormForm form);
// Rust's per-char `char::to_lowercase` (what HF's Lowercase normalizer does).
std::string unicode_lowercase(std::string_view s);
// Rust's `char::is_whitespace` (the Unicode White_Space property).
bool is_white_space(char32_t c);

// GPT-2 byte <-> printable unicode mapping used by the ByteLevel components.
const std::array<std::string, 256>& byte_to_unicode();
int unicode_to_byte(char32_t c);  // -1 when c is not in the table

// ---------------------------------------------------------------- regex.cpp
// A segment of a string produced by a Pattern: [start, end) and whether it matched.
struct Segment {
  size_t start, end;
  bool is_match;
};

// HF `Pattern`: either a literal string or an Oniguruma-style regex (run by PCRE2 with the
// character classes rewritten to Oniguruma's Unicode meanings).
class Pattern {
 public:
  static Pattern literal(std::string text);
  static Pattern regex(const std::string& onig_pattern);

  // Segments covering the whole input in order (HF `Pattern::find_matches`).
  void find_matches(std::string_view s, std::vector<Segment>& out) const;
  // Replace every match with `content` (HF NormalizedString::replace / Replace decoder).
  std::string replace_all(std::string_view s, std::string_view content) const;

  // True if the regex matches at the start of s (anchored). Regex patterns only.
  bool matches_at_start(std::string_view s) const;

 private:
  struct Code;
  std::shared_ptr<const Code> code_;  // null for literal patterns
  std::string literal_;
};

// Translate an Oniguruma (Ruby syntax) pattern into an equivalent PCRE2 pattern.
std::string onig_to_pcre2(const std::string& pattern);

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };
SplitBehavior parse_behavior(const std::string& name);
// Apply a split behavior to find_matches output; returns the kept [start, end) ranges
// (possibly empty ones, which callers drop).
std::vector<std::pair<size_t, size_t>> apply_behavior(std::vector<Segment> segs, SplitBehavior b);

// ---------------------------------------------------------------- components.cpp
// (also home of all tokenizer.json parsing: Tokenizer::from_json / from_file)
// One piece of the text flowing through pre-tokenization. Pieces with id >= 0 are added tokens
// already resolved and are left alone by pre-tokenizers and the model.
struct Piece {
  std::string text;
  bool at_origin = false;  // piece starts at offset 0 of the original input (Metaspace "first")
  int32_t id = -1;
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // `origin_len`: length of the prefix of `s` that comes from the first character of the original
  // input (0 when that character is gone or `s` does not start the input). HF tracks full
  // alignments; this is all Metaspace(prepend_scheme="first") needs from them.
  virtual void normalize(std::string& s, size_t& origin_len) const = 0;
  void normalize(std::string& s) const {
    size_t origin_len = 0;
    normalize(s, origin_len);
  }
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void pre_tokenize(std::vector<Piece>& pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual void decode_chain(std::vector<std::string>& tokens) const = 0;
};


// ---------------------------------------------------------------- bpe.cpp
struct BpeConfig {
  std::vector<std::pair<std::string, int32_t>> vocab;
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order
  bool has_unk = false, has_prefix = false, has_suffix = false;
  std::string unk_token, continuing_subword_prefix, end_of_word_suffix;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
};

class BpeModel {
 public:
  explicit BpeModel(BpeConfig config);

  // Tokenize one pre-token, appending ids (HF BPE::tokenize).
  void tokenize(const std::string& word, std::vector<int32_t>& out) const;

  int32_t token_to_id(const std::string& token) const;  // -1 when absent
  const std::string* id_to_token(int32_t id) const;     // nullptr when absent
  size_t vocab_size() const { return vocab_.size(); }
  const std::unordered_map<std::string, int32_t>& vocab() const { return vocab_; }

 private:
  void merge_word(const std::string& word, std::vector<int32_t>& out) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<int32_t, std::string> vocab_r_;
  // (left id, right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<uint32_t, int32_t>> merges_;
  std::array<int32_t, 256> byte_ids_{};  // ids of <0xXX> tokens, -1 when missing
  bool has_unk_ = false;
  std::string unk_token_;
  std::string prefix_, suffix_;
  bool has_prefix_ = false, has_suffix_ = false;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;

  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// ---------------------------------------------------------------- loading
// Everything tokenizer.json describes, parsed (components.cpp does all the JSON handling) and
// handed to Tokenizer::from_parts (tokenizer.cpp).
struct AddedTokenSpec {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool operator==(const AddedTokenSpec& o) const {
    return content == o.content && single_word == o.single_word && lstrip == o.lstrip && rstrip == o.rstrip &&
           normalized == o.normalized && special == o.special;
  }
};

struct TokenizerParts {
  BpeConfig model;
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Decoder> decoder;
  std::vector<AddedTokenSpec> added_tokens;  // in file order
};

}  // namespace edgeloop::detail
