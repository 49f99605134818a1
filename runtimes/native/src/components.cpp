// Normalizers, pre-tokenizers and decoders, and all tokenizer.json parsing (kept in this one
// translation unit: nlohmann-json templates dominate compile time).
#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "tokenizer_internal.h"

namespace edgeloop::detail {

namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------- JSON helpers

bool json_bool(const json& j, const char* key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) fail(std::string("\"") + key + "\" must be a boolean");
  return j[key].get<bool>();
}

std::string json_string(const json& j, const char* key, const char* where) {
  if (!j.contains(key) || !j[key].is_string())
    fail(std::string(where) + ": missing string field \"" + key + "\"");
  return j[key].get<std::string>();
}

std::string json_type(const json& j, const char* where) {
  if (!j.is_object()) fail(std::string(where) + " must be an object or null");
  if (!j.contains("type") || !j["type"].is_string()) fail(std::string(where) + " has no \"type\"");
  return j["type"].get<std::string>();
}

Pattern pattern_from_json(const json& j, const char* where) {
  if (j.is_object()) {
    if (j.contains("String") && j["String"].is_string()) return Pattern::literal(j["String"].get<std::string>());
    if (j.contains("Regex") && j["Regex"].is_string()) return Pattern::regex(j["Regex"].get<std::string>());
  }
  fail(std::string(where) + ": pattern must be {\"String\": ...} or {\"Regex\": ...}");
}

size_t json_size(const json& j, const char* key, const char* where) {
  if (!j.contains(key) || !j[key].is_number_unsigned())
    fail(std::string(where) + ": missing non-negative integer field \"" + key + "\"");
  return j[key].get<size_t>();
}

char32_t json_char(const json& j, const char* key, const char* where) {
  const std::string s = json_string(j, key, where);
  if (s.empty() || !utf8_valid(s)) fail(std::string(where) + ": \"" + key + "\" must be one character");
  size_t i = 0;
  const char32_t c = utf8_next(s, i);
  if (i != s.size()) fail(std::string(where) + ": \"" + key + "\" must be one character");
  return c;
}

// Applies `fn` to every piece that is not an added token, replacing it with the returned
// sub-pieces; empty sub-pieces are dropped (HF PreTokenizedString::split).
template <typename Fn>
void split_pieces(std::vector<Piece>& pieces, Fn fn) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  std::vector<Piece> parts;
  for (auto& p : pieces) {
    if (p.id >= 0) {
      out.push_back(std::move(p));
      continue;
    }
    parts.clear();
    fn(p, parts);
    for (auto& q : parts)
      if (!q.text.empty()) out.push_back(std::move(q));
  }
  pieces.swap(out);
}

// Split a piece with a pattern and behavior (HF NormalizedString::split).
void split_with(const Piece& p, const Pattern& pattern, bool invert, SplitBehavior behavior,
                std::vector<Piece>& parts) {
  std::vector<Segment> segs;
  pattern.find_matches(p.text, segs);
  if (invert)
    for (auto& s : segs) s.is_match = !s.is_match;
  for (const auto& [start, end] : apply_behavior(std::move(segs), behavior))
    parts.push_back({p.text.substr(start, end - start), p.at_origin && start == 0, -1});
}

// ---------------------------------------------------------------- normalizers

// Character-wise normalizers keep the first character in front (approximated as one character).
void keep_first_char(const std::string& s, size_t& origin_len) {
  if (origin_len > 0) origin_len = s.empty() ? 0 : std::min(utf8_len(static_cast<unsigned char>(s[0])), s.size());
}

class NormSequence final : public Normalizer {
 public:
  explicit NormSequence(std::vector<std::unique_ptr<Normalizer>> items) : items_(std::move(items)) {}
  void normalize(std::string& s, size_t& origin_len) const override {
    for (const auto& n : items_) n->normalize(s, origin_len);
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> items_;
};

class NormUnicode final : public Normalizer {
 public:
  explicit NormUnicode(NormForm form) : form_(form) {}
  void normalize(std::string& s, size_t& origin_len) const override {
    s = unicode_normalize(s, form_);
    keep_first_char(s, origin_len);
  }

 private:
  NormForm form_;
};

class NormPrepend final : public Normalizer {
 public:
  explicit NormPrepend(std::string prefix) : prefix_(std::move(prefix)) {}
  void normalize(std::string& s, size_t& origin_len) const override {
    if (s.empty()) return;
    s.insert(0, prefix_);
    if (origin_len > 0) origin_len += prefix_.size();  // prepended text aligns with the first char
  }

 private:
  std::string prefix_;
};

class NormReplace final : public Normalizer {
 public:
  NormReplace(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void normalize(std::string& s, size_t& origin_len) const override {
    std::vector<Segment> segs;
    pattern_.find_matches(s, segs);
    std::string out;
    out.reserve(s.size());
    size_t new_origin = 0;
    for (const auto& seg : segs) {
      if (seg.start < origin_len) new_origin += seg.is_match ? content_.size() : std::min(seg.end, origin_len) - seg.start;
      if (seg.is_match)
        out += content_;
      else
        out.append(s, seg.start, seg.end - seg.start);
    }
    origin_len = new_origin;
    s.swap(out);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class NormLowercase final : public Normalizer {
 public:
  void normalize(std::string& s, size_t& origin_len) const override {
    s = unicode_lowercase(s);
    keep_first_char(s, origin_len);
  }
};

class NormStrip final : public Normalizer {
 public:
  NormStrip(bool left, bool right) : left_(left), right_(right) {}
  void normalize(std::string& s, size_t& origin_len) const override {
    size_t begin = 0, end = s.size();
    if (left_) {
      while (begin < end) {
        size_t i = begin;
        if (!is_white_space(utf8_next(s, i))) break;
        begin = i;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
        size_t i = start;
        if (!is_white_space(utf8_next(s, i))) break;
        end = start;
      }
    }
    s = s.substr(begin, end - begin);
    origin_len = origin_len > begin ? std::min(origin_len - begin, s.size()) : 0;
  }

 private:
  bool left_, right_;
};

// ---------------------------------------------------------------- pre-tokenizers

class PreSequence final : public PreTokenizer {
 public:
  explicit PreSequence(std::vector<std::unique_ptr<PreTokenizer>> items) : items_(std::move(items)) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    for (const auto& p : items_) p->pre_tokenize(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> items_;
};

const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class PreByteLevel final : public PreTokenizer {
 public:
  PreByteLevel(bool add_prefix_space, bool use_regex)
      : add_prefix_space_(add_prefix_space), use_regex_(use_regex) {
    if (use_regex_) regex_ = Pattern::regex(kGpt2Pattern);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](Piece& p, std::vector<Piece>& parts) {
      if (add_prefix_space_ && p.text[0] != ' ') p.text.insert(0, 1, ' ');
      if (use_regex_)
        split_with(p, regex_, false, SplitBehavior::Isolated, parts);
      else
        parts.push_back(std::move(p));
    });
    const auto& table = byte_to_unicode();
    for (auto& p : pieces) {
      if (p.id >= 0) continue;
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char b : p.text) mapped += table[b];
      p.text.swap(mapped);
    }
  }

 private:
  bool add_prefix_space_, use_regex_;
  Pattern regex_;
};

class PreSplit final : public PreTokenizer {
 public:
  PreSplit(Pattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](Piece& p, std::vector<Piece>& parts) {
      split_with(p, pattern_, invert_, behavior_, parts);
    });
  }

 private:
  Pattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

enum class PrependScheme { Always, First, Never };

PrependScheme parse_prepend_scheme(const json& j, const char* where) {
  PrependScheme scheme = PrependScheme::Always;
  const bool declared = j.contains("prepend_scheme") && !j["prepend_scheme"].is_null();
  if (declared) {
    const std::string s = json_string(j, "prepend_scheme", where);
    if (s == "always")
      scheme = PrependScheme::Always;
    else if (s == "first")
      scheme = PrependScheme::First;
    else if (s == "never")
      scheme = PrependScheme::Never;
    else
      fail(std::string(where) + ": unknown prepend_scheme '" + s + "'");
  }
  // Legacy files carry add_prefix_space instead (HF rejects a contradicting pair).
  if (!json_bool(j, "add_prefix_space", true)) {
    if (declared && scheme != PrependScheme::Never)
      fail(std::string(where) + ": add_prefix_space does not match declared prepend_scheme");
    scheme = PrependScheme::Never;
  }
  return scheme;
}

class PreMetaspace final : public PreTokenizer {
 public:
  PreMetaspace(char32_t replacement, PrependScheme scheme, bool split)
      : scheme_(scheme), split_(split) {
    utf8_append(rep_, replacement);
    space_ = Pattern::literal(" ");
    rep_pattern_ = Pattern::literal(rep_);
  }
  void pre_tokenize(std::vector<Piece>& pieces) const override {
    split_pieces(pieces, [&](Piece& p, std::vector<Piece>& parts) {
      p.text = space_.replace_all(p.text, rep_);
      const bool starts = p.text.compare(0, rep_.size(), rep_) == 0;
      if (!starts && (scheme_ == PrependScheme::Always || (scheme_ == PrependScheme::First && p.at_origin)))
        p.text.insert(0, rep_);
      if (split_)
        split_with(p, rep_pattern_, false, SplitBehavior::MergedWithNext, parts);
      else
        parts.push_back(std::move(p));
    });
  }

 private:
  std::string rep_;
  PrependScheme scheme_;
  bool split_;
  Pattern space_, rep_pattern_;
};

// ---------------------------------------------------------------- decoders

class DecSequence final : public Decoder {
 public:
  explicit DecSequence(std::vector<std::unique_ptr<Decoder>> items) : items_(std::move(items)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& d : items_) d->decode_chain(tokens);
  }

 private:
  std::vector<std::unique_ptr<Decoder>> items_;
};

class DecByteLevel final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      const size_t mark = bytes.size();
      bool ok = true;
      for (size_t i = 0; i < t.size() && ok;) {
        const int b = unicode_to_byte(utf8_next(t, i));
        if (b < 0)
          ok = false;
        else
          bytes.push_back(static_cast<char>(b));
      }
      if (!ok) {  // a token outside the byte alphabet is kept as its raw UTF-8
        bytes.resize(mark);
        bytes += t;
      }
    }
    tokens.assign(1, utf8_lossy(bytes));
  }
};

class DecMetaspace final : public Decoder {
 public:
  DecMetaspace(char32_t replacement, PrependScheme scheme) : rep_(replacement), scheme_(scheme) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      const std::string& t = tokens[k];
      std::string out;
      out.reserve(t.size());
      for (size_t i = 0; i < t.size();) {
        const char32_t c = utf8_next(t, i);
        if (c == rep_) {
          if (!(k == 0 && scheme_ != PrependScheme::Never)) out.push_back(' ');
        } else {
          utf8_append(out, c);
        }
      }
      tokens[k].swap(out);
    }
  }

 private:
  char32_t rep_;
  PrependScheme scheme_;
};

class DecReplace final : public Decoder {
 public:
  DecReplace(Pattern pattern, std::string content) : pattern_(std::move(pattern)), content_(std::move(content)) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) t = pattern_.replace_all(t, content_);
  }

 private:
  Pattern pattern_;
  std::string content_;
};

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

class DecByteFallback final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&]() {
      if (pending.empty()) return;
      if (utf8_valid(pending))
        out.push_back(pending);
      else
        for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      pending.clear();
    };
    for (auto& t : tokens) {
      const int b = byte_of(t);
      if (b >= 0) {
        pending.push_back(static_cast<char>(b));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens.swap(out);
  }

 private:
  // "<0xAB>" -> 0xAB (parsed like Rust's u8::from_str_radix on the two characters), else -1.
  static int byte_of(const std::string& t) {
    if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
    const int lo = hex_value(t[4]);
    if (lo < 0) return -1;
    if (t[3] == '+') return lo;
    const int hi = hex_value(t[3]);
    return hi < 0 ? -1 : hi * 16 + lo;
  }
};

class DecFuse final : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens.assign(1, std::move(all));
  }
};

class DecStrip final : public Decoder {
 public:
  DecStrip(char32_t content, size_t start, size_t stop) : content_(content), start_(start), stop_(stop) {}
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      const std::vector<char32_t> chars = utf8_decode(t);
      size_t start_cut = 0;
      for (size_t i = 0; i < chars.size() && i < start_; ++i) {
        if (chars[i] != content_) break;
        start_cut = i + 1;
      }
      size_t stop_cut = chars.size();
      for (size_t i = 0; i < stop_ && i < chars.size(); ++i) {
        const size_t index = chars.size() - i - 1;
        if (chars[index] != content_) break;
        stop_cut = index;
      }
      std::string out;
      for (size_t i = start_cut; i < stop_cut; ++i) utf8_append(out, chars[i]);
      t.swap(out);
    }
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

template <typename T, typename Make>
std::vector<std::unique_ptr<T>> make_list(const json& j, const char* key, const char* where, Make make) {
  if (!j.contains(key) || !j[key].is_array()) fail(std::string(where) + ": missing array \"" + key + "\"");
  std::vector<std::unique_ptr<T>> items;
  for (const auto& item : j[key]) {
    auto made = make(item);
    if (made) items.push_back(std::move(made));
  }
  return items;
}

std::unique_ptr<Normalizer> make_normalizer(const json& j) {
  if (j.is_null()) return nullptr;
  const std::string type = json_type(j, "normalizer");
  if (type == "Sequence")
    return std::make_unique<NormSequence>(make_list<Normalizer>(j, "normalizers", "normalizer Sequence", make_normalizer));
  if (type == "NFC") return std::make_unique<NormUnicode>(NormForm::NFC);
  if (type == "NFD") return std::make_unique<NormUnicode>(NormForm::NFD);
  if (type == "NFKC") return std::make_unique<NormUnicode>(NormForm::NFKC);
  if (type == "NFKD") return std::make_unique<NormUnicode>(NormForm::NFKD);
  if (type == "Prepend") return std::make_unique<NormPrepend>(json_string(j, "prepend", "normalizer Prepend"));
  if (type == "Replace") {
    if (!j.contains("pattern")) fail("normalizer Replace: missing \"pattern\"");
    return std::make_unique<NormReplace>(pattern_from_json(j["pattern"], "normalizer Replace"),
                                         json_string(j, "content", "normalizer Replace"));
  }
  if (type == "Lowercase") return std::make_unique<NormLowercase>();
  if (type == "Strip")
    return std::make_unique<NormStrip>(json_bool(j, "strip_left", true), json_bool(j, "strip_right", true));
  fail("unsupported normalizer type '" + type + "'");
}

std::unique_ptr<PreTokenizer> make_pre_tokenizer(const json& j) {
  if (j.is_null()) return nullptr;
  const std::string type = json_type(j, "pre_tokenizer");
  if (type == "Sequence")
    return std::make_unique<PreSequence>(
        make_list<PreTokenizer>(j, "pretokenizers", "pre_tokenizer Sequence", make_pre_tokenizer));
  if (type == "ByteLevel")
    return std::make_unique<PreByteLevel>(json_bool(j, "add_prefix_space", true), json_bool(j, "use_regex", true));
  if (type == "Split") {
    if (!j.contains("pattern")) fail("pre_tokenizer Split: missing \"pattern\"");
    return std::make_unique<PreSplit>(pattern_from_json(j["pattern"], "pre_tokenizer Split"),
                                      parse_behavior(json_string(j, "behavior", "pre_tokenizer Split")),
                                      json_bool(j, "invert", false));
  }
  if (type == "Metaspace")
    return std::make_unique<PreMetaspace>(json_char(j, "replacement", "pre_tokenizer Metaspace"),
                                          parse_prepend_scheme(j, "pre_tokenizer Metaspace"),
                                          json_bool(j, "split", true));
  if (type == "Whitespace")  // Rust regex \w+|[^\w\s]+ (Rust's \w: Alphabetic, M, Nd, Pc, Join_Control)
    return std::make_unique<PreSplit>(
        Pattern::regex(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]+)"
                       R"(|[^\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}\p{White_Space}]+)"),
        SplitBehavior::Removed, true);
  if (type == "WhitespaceSplit")
    return std::make_unique<PreSplit>(Pattern::regex(R"(\p{White_Space})"), SplitBehavior::Removed, false);
  if (type == "Digits")
    return std::make_unique<PreSplit>(
        Pattern::regex(R"(\p{N})"),
        json_bool(j, "individual_digits", false) ? SplitBehavior::Isolated : SplitBehavior::Contiguous, false);
  fail("unsupported pre_tokenizer type '" + type + "'");
}

std::unique_ptr<Decoder> make_decoder(const json& j) {
  if (j.is_null()) return nullptr;
  const std::string type = json_type(j, "decoder");
  if (type == "Sequence")
    return std::make_unique<DecSequence>(make_list<Decoder>(j, "decoders", "decoder Sequence", make_decoder));
  if (type == "ByteLevel") return std::make_unique<DecByteLevel>();
  if (type == "Metaspace")
    return std::make_unique<DecMetaspace>(json_char(j, "replacement", "decoder Metaspace"),
                                          parse_prepend_scheme(j, "decoder Metaspace"));
  if (type == "Replace") {
    if (!j.contains("pattern")) fail("decoder Replace: missing \"pattern\"");
    return std::make_unique<DecReplace>(pattern_from_json(j["pattern"], "decoder Replace"),
                                        json_string(j, "content", "decoder Replace"));
  }
  if (type == "ByteFallback") return std::make_unique<DecByteFallback>();
  if (type == "Fuse") return std::make_unique<DecFuse>();
  if (type == "Strip")
    return std::make_unique<DecStrip>(json_char(j, "content", "decoder Strip"), json_size(j, "start", "decoder Strip"),
                                      json_size(j, "stop", "decoder Strip"));
  fail("unsupported decoder type '" + type + "'");
}

// ---------------------------------------------------------------- model, added tokens

bool optional_string(const json& j, const char* key, std::string& out) {
  if (!j.contains(key) || j[key].is_null()) return false;
  if (!j[key].is_string()) fail(std::string("model: \"") + key + "\" must be a string or null");
  out = j[key].get<std::string>();
  return true;
}

BpeConfig parse_bpe_config(const json& j) {
  BpeConfig c;
  if (j.contains("dropout") && !j["dropout"].is_null()) {
    if (!j["dropout"].is_number() || j["dropout"].get<double>() != 0.0)
      fail("model: BPE dropout is not supported (must be null)");
  }
  c.has_unk = optional_string(j, "unk_token", c.unk_token);
  c.has_prefix = optional_string(j, "continuing_subword_prefix", c.continuing_subword_prefix);
  c.has_suffix = optional_string(j, "end_of_word_suffix", c.end_of_word_suffix);
  c.fuse_unk = json_bool(j, "fuse_unk", false);
  c.byte_fallback = json_bool(j, "byte_fallback", false);
  c.ignore_merges = json_bool(j, "ignore_merges", false);

  if (!j.contains("vocab") || !j["vocab"].is_object()) fail("model: BPE \"vocab\" must be an object");
  const json& vocab = j["vocab"];
  c.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer()) fail("model: vocab id of '" + it.key() + "' is not an integer");
    const auto id = it.value().get<int64_t>();
    if (id < 0 || id > INT32_MAX) fail("model: vocab id of '" + it.key() + "' is out of range");
    c.vocab.emplace_back(it.key(), static_cast<int32_t>(id));
  }

  if (!j.contains("merges") || j["merges"].is_null()) return c;
  const json& merges = j["merges"];
  if (!merges.is_array()) fail("model: BPE \"merges\" must be an array");
  c.merges.reserve(merges.size());
  for (const auto& m : merges) {
    if (m.is_string()) {
      const std::string& line = m.get_ref<const std::string&>();
      const size_t sp = line.find(' ');
      if (sp == std::string::npos) fail("model: invalid merge '" + line + "' (expected \"a b\")");
      c.merges.emplace_back(line.substr(0, sp), line.substr(sp + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      c.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      fail("model: invalid merge entry (expected \"a b\" or [a, b])");
    }
  }
  return c;
}

TokenizerParts parse_tokenizer(const json& j) {
  if (!j.is_object()) fail("tokenizer.json must contain a JSON object");
  TokenizerParts parts;
  if (!j.contains("model") || !j["model"].is_object()) fail("missing \"model\"");
  const json& m = j["model"];
  std::string model_type = m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "";
  if (model_type.empty() && m.contains("merges")) model_type = "BPE";
  if (model_type != "BPE") fail("unsupported model type '" + model_type + "' (only BPE is supported)");
  parts.model = parse_bpe_config(m);

  const json null_json;
  parts.normalizer = make_normalizer(j.contains("normalizer") ? j["normalizer"] : null_json);
  parts.pre_tokenizer = make_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : null_json);
  parts.decoder = make_decoder(j.contains("decoder") ? j["decoder"] : null_json);
  // post_processor is not needed: encode() never adds special tokens.

  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    if (!j["added_tokens"].is_array()) fail("\"added_tokens\" must be an array");
    for (const auto& t : j["added_tokens"]) {
      AddedTokenSpec tok;
      tok.content = json_string(t, "content", "added token");
      tok.special = json_bool(t, "special", false);
      tok.single_word = json_bool(t, "single_word", false);
      tok.lstrip = json_bool(t, "lstrip", false);
      tok.rstrip = json_bool(t, "rstrip", false);
      tok.normalized = json_bool(t, "normalized", !tok.special);
      parts.added_tokens.push_back(std::move(tok));
    }
  }
  return parts;
}

}  // namespace
}  // namespace edgeloop::detail

namespace edgeloop {

std::unique_ptr<Tokenizer> Tokenizer::from_json(const std::string& json_text) {
  detail::json j;
  try {
    j = detail::json::parse(json_text);
  } catch (const detail::json::exception& e) {
    detail::fail(std::string("invalid JSON: ") + e.what());
  }
  try {
    return from_parts(detail::parse_tokenizer(j));
  } catch (const detail::json::exception& e) {
    detail::fail(std::string("malformed tokenizer.json: ") + e.what());
  }
}

std::unique_ptr<Tokenizer> Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail("cannot open tokenizer file '" + path + "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) detail::fail("cannot read tokenizer file '" + path + "'");
  try {
    return from_json(ss.str());
  } catch (const TokenizerError& e) {
    detail::fail(path + ": " + e.what());
  }
}

}  // namespace edgeloop
