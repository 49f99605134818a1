// Tokenizer: added-token extraction, the encode pipeline and decode, following HF `tokenizers`
// (TokenizerImpl + AddedVocabulary).
#include "tokenizer.h"

#include <algorithm>
#include <unordered_set>

#include "tokenizer_internal.h"

namespace edgeloop {

using detail::fail;

namespace {

using AddedToken = detail::AddedTokenSpec;

// Leftmost-longest, non-overlapping matcher over a set of strings (HF uses Aho-Corasick with
// MatchKind::LeftmostLongest; on ties between equal strings the first one wins).
class AddedMatcher {
 public:
  void build(const std::vector<std::pair<std::string, int32_t>>& patterns) {
    for (auto& b : buckets_) b.clear();
    for (size_t i = 0; i < patterns.size(); ++i) {
      if (patterns[i].first.empty()) continue;
      buckets_[static_cast<unsigned char>(patterns[i].first[0])].push_back(patterns[i]);
    }
    for (auto& b : buckets_)
      std::stable_sort(b.begin(), b.end(),
                       [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
    empty_ = patterns.empty();
  }
  bool empty() const { return empty_; }

  // Next match starting at or after `from`: returns false when none.
  bool next(std::string_view s, size_t from, size_t& start, size_t& end, int32_t& id) const {
    for (size_t i = from; i < s.size(); ++i) {
      for (const auto& [pat, pid] : buckets_[static_cast<unsigned char>(s[i])]) {
        if (s.compare(i, pat.size(), pat) == 0) {
          start = i;
          end = i + pat.size();
          id = pid;
          return true;
        }
      }
    }
    return false;
  }

 private:
  std::array<std::vector<std::pair<std::string, int32_t>>, 256> buckets_;
  bool empty_ = true;
};

struct Span {
  size_t start, end;
  int32_t id;  // -1: plain text
};

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<detail::Normalizer> normalizer;
  std::unique_ptr<detail::PreTokenizer> pre_tokenizer;
  std::unique_ptr<detail::Decoder> decoder;
  std::unique_ptr<detail::BpeModel> model;

  std::unordered_map<std::string, int32_t> added_map;
  std::unordered_map<int32_t, AddedToken> added_r;
  std::vector<AddedToken> special_tokens, added_tokens;  // in insertion order
  std::unordered_set<std::string> special_set;
  // Decoding form of normalized added tokens whose normalized content differs (HF returns the
  // normalized form from id_to_token / decode so the decoder can invert it).
  std::unordered_map<int32_t, std::string> normalized_form;
  AddedMatcher raw_matcher, norm_matcher;
  size_t vocab_size = 0;
  detail::Pattern word_char;  // Rust regex \w, for single_word

  int32_t token_to_id(const std::string& token) const {
    const auto it = added_map.find(token);
    if (it != added_map.end()) return it->second;
    return model->token_to_id(token);
  }

  const std::string* id_to_token(int32_t id) const {
    const auto it = added_r.find(id);
    if (it != added_r.end()) {
      const auto nf = normalized_form.find(id);
      return nf != normalized_form.end() ? &nf->second : &it->second.content;
    }
    return model->id_to_token(id);
  }

  // HF AddedVocabulary::add_tokens for one token.
  void add_token(const AddedToken& token) {
    if (token.special && !token.content.empty() && !special_set.count(token.content)) {
      special_tokens.push_back(token);
      special_set.insert(token.content);
    }
    if (token.content.empty()) return;
    for (const auto& kv : added_r)
      if (kv.second == token) return;
    int32_t new_id = token_to_id(token.content);
    if (new_id < 0) {
      const auto model_size = static_cast<int64_t>(model->vocab_size());
      int64_t max_id = -1;
      for (const auto& kv : added_map) max_id = std::max<int64_t>(max_id, kv.second);
      if (max_id < 0)
        new_id = static_cast<int32_t>(model_size);
      else
        new_id = static_cast<int32_t>((max_id >= model_size || model_size == 0) ? max_id + 1 : model_size);
    }
    added_map[token.content] = new_id;
    added_r[new_id] = token;
    if (!special_set.count(token.content)) added_tokens.push_back(token);
  }

  void refresh_matchers() {
    std::vector<std::pair<std::string, int32_t>> raw, norm;
    auto visit = [&](const AddedToken& t) {
      const int32_t id = token_to_id(t.content);
      if (!t.normalized) {
        raw.emplace_back(t.content, id);
      } else {
        std::string content = t.content;
        if (normalizer) normalizer->normalize(content);
        norm.emplace_back(content, id);
      }
    };
    for (const auto& t : special_tokens) visit(t);
    for (const auto& t : added_tokens) visit(t);
    raw_matcher.build(raw);
    norm_matcher.build(norm);
    normalized_form.clear();
    if (normalizer) {
      for (const auto& [id, t] : added_r) {
        if (!t.normalized) continue;
        std::string content = t.content;
        normalizer->normalize(content);
        if (content != t.content) normalized_form[id] = std::move(content);
      }
    }
  }

  bool is_word_char_at(std::string_view s, size_t pos) const { return word_char.matches_at_start(s.substr(pos)); }

  // HF AddedVocabulary::find_matches: spans covering `s`, added tokens resolved.
  void find_added(std::string_view s, const AddedMatcher& matcher, std::vector<Span>& out) const {
    out.clear();
    if (matcher.empty()) {
      out.push_back({0, s.size(), -1});
      return;
    }
    size_t start_offset = 0, search_from = 0, start = 0, stop = 0;
    int32_t id = -1;
    while (matcher.next(s, search_from, start, stop, id)) {
      search_from = stop;
      const AddedToken& tok = added_r.at(id);
      if (tok.single_word) {
        bool start_space = start == 0;
        if (!start_space) {
          size_t prev = start - 1;
          while (prev > 0 && (static_cast<unsigned char>(s[prev]) & 0xC0) == 0x80) --prev;
          start_space = !is_word_char_at(s, prev);
        }
        const bool stop_space = stop == s.size() || !is_word_char_at(s, stop);
        if (!start_space || !stop_space) continue;
      }
      if (tok.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          size_t prev = new_start - 1;
          while (prev > 0 && (static_cast<unsigned char>(s[prev]) & 0xC0) == 0x80) --prev;
          size_t i = prev;
          if (!detail::is_white_space(detail::utf8_next(s, i))) break;
          new_start = prev;
        }
        start = std::max(new_start, start_offset);
      }
      if (tok.rstrip) {
        while (stop < s.size()) {
          size_t i = stop;
          if (!detail::is_white_space(detail::utf8_next(s, i))) break;
          stop = i;
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, -1});
      out.push_back({start, stop, id});
      start_offset = stop;
    }
    if (start_offset != s.size()) out.push_back({start_offset, s.size(), -1});
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

std::unique_ptr<Tokenizer> Tokenizer::from_parts(detail::TokenizerParts&& parts) {
  auto impl = std::make_unique<Impl>();
  impl->word_char = detail::Pattern::regex(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])");
  impl->model = std::make_unique<detail::BpeModel>(std::move(parts.model));
  impl->normalizer = std::move(parts.normalizer);
  impl->pre_tokenizer = std::move(parts.pre_tokenizer);
  impl->decoder = std::move(parts.decoder);
  for (const auto& t : parts.added_tokens) impl->add_token(t);  // one at a time, like HF's loader
  impl->refresh_matchers();
  impl->vocab_size = impl->model->vocab_size();
  for (const auto& kv : impl->added_map)
    if (impl->model->token_to_id(kv.first) < 0) ++impl->vocab_size;
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  if (!detail::utf8_valid(text)) fail("encode: input text is not valid UTF-8");
  std::vector<int32_t> ids;
  if (text.empty()) return ids;
  const Impl& im = *impl_;

  // 1. Added tokens matched on the raw text; 2. normalize the rest and match normalized ones.
  std::vector<detail::Piece> pieces;
  std::vector<Span> spans, spans2;
  im.find_added(text, im.raw_matcher, spans);
  for (const auto& sp : spans) {
    if (sp.end == sp.start) continue;
    if (sp.id >= 0) {
      pieces.push_back({std::string(text.substr(sp.start, sp.end - sp.start)), false, sp.id});
      continue;
    }
    std::string norm(text.substr(sp.start, sp.end - sp.start));
    size_t origin_len = sp.start == 0 ? detail::utf8_len(static_cast<unsigned char>(norm[0])) : 0;
    if (im.normalizer) im.normalizer->normalize(norm, origin_len);
    if (norm.empty()) continue;
    im.find_added(norm, im.norm_matcher, spans2);
    for (const auto& s2 : spans2) {
      if (s2.end == s2.start) continue;
      pieces.push_back({norm.substr(s2.start, s2.end - s2.start), s2.start < origin_len, s2.id});
    }
  }

  // 3. Pre-tokenize, 4. run the model on every piece that is not an added token.
  if (im.pre_tokenizer) im.pre_tokenizer->pre_tokenize(pieces);
  ids.reserve(text.size() / 3 + 4);
  for (const auto& p : pieces) {
    if (p.id >= 0)
      ids.push_back(p.id);
    else
      im.model->tokenize(p.text, ids);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    const std::string* tok = im.id_to_token(id);
    if (!tok) fail("decode: token id " + std::to_string(id) + " is out of range");
    if (skip_special_tokens && im.special_set.count(*tok)) continue;
    tokens.push_back(*tok);
  }
  std::string out;
  if (im.decoder) {
    im.decoder->decode_chain(tokens);
    for (const auto& t : tokens) out += t;
  } else {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i) out += ' ';
      out += tokens[i];
    }
  }
  return out;
}

int32_t Tokenizer::token_to_id(std::string_view token) const { return impl_->token_to_id(std::string(token)); }

bool Tokenizer::id_to_token(int32_t id, std::string& token) const {
  const std::string* t = impl_->id_to_token(id);
  if (!t) return false;
  token = *t;
  return true;
}

size_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

bool Tokenizer::is_special(int32_t id) const {
  const std::string* t = impl_->id_to_token(id);
  return t && impl_->special_set.count(*t) > 0;
}

}  // namespace edgeloop
