// Patterns (literal strings and regexes) with HF `tokenizers` matching semantics, on PCRE2.
//
// HF runs its regexes with Oniguruma (Ruby syntax). PCRE2 in UTF+UCP mode accepts the same
// syntax for everything tokenizer.json files use (\p{..}, lookahead, possessive and bounded
// repeats, (?i:..)), but a few escapes mean different things, so the pattern is rewritten first:
//   \s \S  -> White_Space property (Oniguruma), PCRE2's \s also takes U+180E
//   \w \W  -> Letter | Mark | Number | Connector_Punctuation (Oniguruma), PCRE2's lacks Mark/Pc
//   \h \H  -> hexadecimal digit (Oniguruma); PCRE2's \h is horizontal space
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>

#include "tokenizer_internal.h"

namespace edgeloop::detail {

std::string onig_to_pcre2(const std::string& p) {
  static const char* kWord = "\\p{L}\\p{M}\\p{N}\\p{Pc}";
  static const char* kHex = "0-9a-fA-F";
  std::string out;
  out.reserve(p.size() + 16);
  bool in_class = false;
  size_t class_start = 0;  // index in `p` just after the '[' (and '^') of the current class
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char d = p[++i];
      switch (d) {
        case 's': out += "\\p{White_Space}"; break;
        case 'S': out += "\\P{White_Space}"; break;
        case 'd': out += "\\p{Nd}"; break;
        case 'D': out += "\\P{Nd}"; break;
        case 'w':
          out += in_class ? std::string(kWord) : "[" + std::string(kWord) + "]";
          break;
        case 'h':
          out += in_class ? std::string(kHex) : "[" + std::string(kHex) + "]";
          break;
        case 'W':
        case 'H':
          if (in_class) fail(std::string("unsupported regex construct \\") + d + " inside a character class: " + p);
          out += "[^" + std::string(d == 'W' ? kWord : kHex) + "]";
          break;
        default:
          out += '\\';
          out += d;
      }
      continue;
    }
    if (in_class) {
      if (c == '[') {
        if (i + 1 < p.size() && p[i + 1] == ':') {  // POSIX class [:alpha:], same in PCRE2
          const size_t end = p.find(":]", i + 2);
          if (end == std::string::npos) fail("unterminated POSIX class in regex: " + p);
          out.append(p, i, end + 2 - i);
          i = end + 1;
          continue;
        }
        fail("unsupported regex construct (nested character class / set operation): " + p);
      }
      if (c == '&' && i + 1 < p.size() && p[i + 1] == '&')
        fail("unsupported regex construct (character class intersection): " + p);
      if (c == ']' && i != class_start) in_class = false;
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
      class_start = i + 1;
      continue;
    }
    out += c;
  }
  return out;
}

struct Pattern::Code {
  pcre2_code* code = nullptr;
  ~Code() {
    if (code) pcre2_code_free(code);
  }
};

namespace {

// Per-thread JIT stack large enough for long whitespace / letter runs.
struct JitContext {
  pcre2_jit_stack* stack = nullptr;
  pcre2_match_context* mctx = nullptr;
  JitContext() {
    mctx = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
    if (mctx && stack) pcre2_jit_stack_assign(mctx, nullptr, stack);
  }
  ~JitContext() {
    if (stack) pcre2_jit_stack_free(stack);
    if (mctx) pcre2_match_context_free(mctx);
  }
};

pcre2_match_context* match_context() {
  thread_local JitContext ctx;
  return ctx.mctx;
}

struct MatchData {
  pcre2_match_data* md;
  explicit MatchData(const pcre2_code* code) : md(pcre2_match_data_create_from_pattern(code, nullptr)) {
    if (!md) fail("out of memory (pcre2 match data)");
  }
  ~MatchData() { pcre2_match_data_free(md); }
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
};

// One search from `from`; returns false when there is no match.
bool search(const pcre2_code* code, pcre2_match_data* md, std::string_view s, size_t from,
            uint32_t options, size_t& ms, size_t& me) {
  const int rc = pcre2_match(code, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), from,
                             options | PCRE2_NO_UTF_CHECK, md, match_context());
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(rc, buf, sizeof(buf));
    fail(std::string("regex match failed: ") + reinterpret_cast<const char*>(buf));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
  ms = ov[0];
  me = ov[1];
  if (me < ms) me = ms;  // \K tricks; never produced by tokenizer patterns
  return true;
}

}  // namespace

Pattern Pattern::literal(std::string text) {
  Pattern p;
  p.literal_ = std::move(text);
  return p;
}

Pattern Pattern::regex(const std::string& onig_pattern) {
  const std::string translated = onig_to_pcre2(onig_pattern);
  pcre2_compile_context* cctx = pcre2_compile_context_create(nullptr);
  pcre2_set_newline(cctx, PCRE2_NEWLINE_LF);
  int err = 0;
  PCRE2_SIZE err_off = 0;
  // Ruby syntax: ^ and $ are line anchors.
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(),
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &err_off, cctx);
  pcre2_compile_context_free(cctx);
  if (!code) {
    PCRE2_UCHAR buf[256];
    pcre2_get_error_message(err, buf, sizeof(buf));
    fail("invalid regex '" + onig_pattern + "': " + reinterpret_cast<const char*>(buf) + " at offset " +
         std::to_string(err_off));
  }
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if unavailable
  auto c = std::make_shared<Code>();
  c->code = code;
  Pattern p;
  p.code_ = std::move(c);
  return p;
}

void Pattern::find_matches(std::string_view s, std::vector<Segment>& out) const {
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, false});
    return;
  }
  size_t prev = 0;
  if (!code_) {
    if (literal_.empty()) {
      out.push_back({0, s.size(), false});
      return;
    }
    size_t pos = 0;
    while ((pos = s.find(literal_, pos)) != std::string_view::npos) {
      if (prev != pos) out.push_back({prev, pos, false});
      out.push_back({pos, pos + literal_.size(), true});
      pos += literal_.size();
      prev = pos;
    }
  } else {
    // Oniguruma find_iter: an empty match right where the previous match ended is skipped by
    // moving one character forward.
    MatchData md(code_->code);
    size_t last_end = 0, last_match = 0, ms = 0, me = 0;
    bool have_last = false;
    while (last_end <= s.size()) {
      if (!search(code_->code, md.md, s, last_end, 0, ms, me)) break;
      if (ms == me && have_last && last_match == me) {
        last_end += last_end < s.size() ? utf8_len(static_cast<unsigned char>(s[last_end])) : 1;
        continue;
      }
      last_end = me;
      last_match = me;
      have_last = true;
      if (prev != ms) out.push_back({prev, ms, false});
      out.push_back({ms, me, true});
      prev = me;
    }
  }
  if (prev != s.size()) out.push_back({prev, s.size(), false});
}

std::string Pattern::replace_all(std::string_view s, std::string_view content) const {
  std::vector<Segment> segs;
  find_matches(s, segs);
  std::string out;
  out.reserve(s.size());
  for (const auto& seg : segs) {
    if (seg.is_match)
      out.append(content);
    else
      out.append(s.substr(seg.start, seg.end - seg.start));
  }
  return out;
}

bool Pattern::matches_at_start(std::string_view s) const {
  if (!code_) return s.substr(0, literal_.size()) == literal_;
  MatchData md(code_->code);
  size_t ms = 0, me = 0;
  return search(code_->code, md.md, s, 0, PCRE2_ANCHORED, ms, me);
}

SplitBehavior parse_behavior(const std::string& name) {
  if (name == "Removed") return SplitBehavior::Removed;
  if (name == "Isolated") return SplitBehavior::Isolated;
  if (name == "MergedWithPrevious") return SplitBehavior::MergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::MergedWithNext;
  if (name == "Contiguous") return SplitBehavior::Contiguous;
  fail("unsupported split behavior '" + name + "'");
}

std::vector<std::pair<size_t, size_t>> apply_behavior(std::vector<Segment> segs, SplitBehavior b) {
  std::vector<std::pair<size_t, size_t>> out;
  out.reserve(segs.size());
  bool previous_match = false;
  switch (b) {
    case SplitBehavior::Isolated:
      for (const auto& s : segs) out.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::Removed:
      for (const auto& s : segs)
        if (!s.is_match) out.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::Contiguous:
      for (const auto& s : segs) {
        if (s.is_match == previous_match && !out.empty())
          out.back().second = s.end;
        else
          out.emplace_back(s.start, s.end);
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithPrevious:
      for (const auto& s : segs) {
        if (s.is_match && !previous_match && !out.empty())
          out.back().second = s.end;
        else
          out.emplace_back(s.start, s.end);
        previous_match = s.is_match;
      }
      break;
    case SplitBehavior::MergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->is_match && !previous_match && !out.empty())
          out.back().first = it->start;
        else
          out.emplace_back(it->start, it->end);
        previous_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  return out;
}

}  // namespace edgeloop::detail
