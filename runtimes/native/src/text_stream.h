// Token ids -> text pieces (runtimes/tokenizer.py IncrementalDecoder and runtimes/model.py
// TextStream): UTF-8-safe incremental detokenization over Tokenizer::decode, and stop strings
// held back while they might still be completing. Lengths and slices are in code points, as
// Python's str does, so the pieces are the Python runtime's byte for byte.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer.h"

namespace edgeloop {

class IncrementalDecoder {
 public:
  explicit IncrementalDecoder(const Tokenizer& tokenizer) : tok_(tokenizer) {}
  std::string push(int32_t token);  // "" until the new text no longer ends in an incomplete character
  std::string flush();              // what is left (an incomplete character stays U+FFFD)

 private:
  std::string decode(size_t from, size_t to) const;
  const Tokenizer& tok_;
  std::vector<int32_t> ids_;
  size_t prefix_ = 0, read_ = 0;
};

class TextStream {
 public:
  TextStream(const Tokenizer& tokenizer, std::vector<std::string> stops);
  std::string push(int32_t token);
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  IncrementalDecoder decoder_;
  std::string pending_;
  bool stopped_ = false;
};

size_t utf8_length(const std::string& s);                    // code points
size_t utf8_offset(const std::string& s, size_t codepoints);  // byte offset of the n-th code point

}  // namespace edgeloop
