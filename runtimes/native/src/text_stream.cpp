// Incremental detokenization and stop strings: ports of IncrementalDecoder (runtimes/tokenizer.py)
// and TextStream (runtimes/model.py).
#include "text_stream.h"

#include <algorithm>

namespace edgeloop {

namespace {

const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Earliest byte offset of any stop string in `text` (npos when none). Byte offsets order the
// same way as code-point offsets, and a valid UTF-8 needle only matches at character starts.
size_t find_stop(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = std::string::npos;
  for (const auto& s : stops) best = std::min(best, text.find(s));
  return best;
}

// Bytes of the longest suffix of `text` that is a proper prefix of some stop string
// (runtimes/model.py _stop_prefix_len, in code points there; the same text either way).
size_t stop_prefix_len(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const auto& s : stops) {
    const size_t chars = utf8_length(s);
    for (size_t n = std::min(chars ? chars - 1 : 0, utf8_length(text)); n > 0; --n) {
      const std::string head = s.substr(0, utf8_offset(s, n));
      if (ends_with(text, head)) {
        best = std::max(best, head.size());
        break;
      }
    }
  }
  return best;
}

}  // namespace

size_t utf8_length(const std::string& s) {
  size_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

size_t utf8_offset(const std::string& s, size_t codepoints) {
  size_t seen = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    if ((static_cast<unsigned char>(s[i]) & 0xC0) != 0x80) {
      if (seen == codepoints) return i;
      ++seen;
    }
  }
  return s.size();
}

std::string IncrementalDecoder::decode(size_t from, size_t to) const {
  // ids the tokenizer does not know (a model's padded vocabulary) decode to nothing, as in HF
  std::vector<int32_t> ids;
  std::string unused;
  for (size_t i = from; i < to; ++i)
    if (tok_.id_to_token(ids_[i], unused)) ids.push_back(ids_[i]);
  return tok_.decode(ids);
}

std::string IncrementalDecoder::push(int32_t token) {
  ids_.push_back(token);
  const std::string done = decode(prefix_, read_);
  const std::string full = decode(prefix_, ids_.size());
  const size_t done_chars = utf8_length(done);
  if (ends_with(full, kReplacement) || utf8_length(full) <= done_chars) return "";
  prefix_ = read_;
  read_ = ids_.size();
  return full.substr(utf8_offset(full, done_chars));
}

std::string IncrementalDecoder::flush() {
  const std::string done = decode(prefix_, read_);
  const std::string full = decode(prefix_, ids_.size());
  prefix_ = read_ = ids_.size();
  return full.substr(utf8_offset(full, utf8_length(done)));
}

TextStream::TextStream(const Tokenizer& tokenizer, std::vector<std::string> stops) : decoder_(tokenizer) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string TextStream::push(int32_t token) {
  pending_ += decoder_.push(token);
  const size_t cut = find_stop(pending_, stops_);
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, cut);
    pending_.clear();
    return out;
  }
  const size_t safe = pending_.size() - stop_prefix_len(pending_, stops_);
  std::string out = pending_.substr(0, safe);
  pending_.erase(0, safe);
  return out;
}

std::string TextStream::flush() {
  pending_ += decoder_.flush();
  const size_t cut = find_stop(pending_, stops_);
  if (cut != std::string::npos) {
    stopped_ = true;
    pending_.resize(cut);
  }
  std::string out = std::move(pending_);
  pending_.clear();
  return out;
}

}  // namespace edgeloop
