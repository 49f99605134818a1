// BPE model with HF `tokenizers` semantics (merge priority queue, unk fusing, byte fallback,
// ignore_merges, continuing_subword_prefix / end_of_word_suffix) and a per-word cache.
#include <cstdio>
#include <queue>

#include "tokenizer_internal.h"

namespace edgeloop::detail {

namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

constexpr size_t kCacheMaxEntries = 200000;
constexpr size_t kCacheMaxWordBytes = 256;

}  // namespace

BpeModel::BpeModel(BpeConfig config) {
  has_unk_ = config.has_unk;
  unk_token_ = std::move(config.unk_token);
  has_prefix_ = config.has_prefix;
  prefix_ = std::move(config.continuing_subword_prefix);
  has_suffix_ = config.has_suffix;
  suffix_ = std::move(config.end_of_word_suffix);
  fuse_unk_ = config.fuse_unk;
  byte_fallback_ = config.byte_fallback;
  ignore_merges_ = config.ignore_merges;

  vocab_.reserve(config.vocab.size());
  vocab_r_.reserve(config.vocab.size());
  for (auto& [token, id] : config.vocab) {
    vocab_r_[id] = token;
    vocab_[std::move(token)] = id;
  }

  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_ids_[b] = token_to_id(name);
  }

  merges_.reserve(config.merges.size());
  const size_t prefix_len = has_prefix_ ? prefix_.size() : 0;
  uint32_t rank = 0;
  for (const auto& [a, b] : config.merges) {
    const int32_t a_id = token_to_id(a), b_id = token_to_id(b);
    if (a_id < 0) fail("model: merge token '" + a + "' is not in the vocabulary");
    if (b_id < 0) fail("model: merge token '" + b + "' is not in the vocabulary");
    const std::string merged = a + (b.size() >= prefix_len ? b.substr(prefix_len) : std::string());
    const int32_t new_id = token_to_id(merged);
    if (new_id < 0) fail("model: merged token '" + merged + "' is not in the vocabulary");
    merges_[pair_key(a_id, b_id)] = {rank++, new_id};  // a later duplicate wins, as in HF
  }
}

int32_t BpeModel::token_to_id(const std::string& token) const {
  const auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

const std::string* BpeModel::id_to_token(int32_t id) const {
  const auto it = vocab_r_.find(id);
  return it == vocab_r_.end() ? nullptr : &it->second;
}

void BpeModel::tokenize(const std::string& word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    const int32_t id = token_to_id(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  const bool cacheable = word.size() <= kCacheMaxWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(word, ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kCacheMaxEntries) cache_.clear();
    cache_.emplace(word, std::move(ids));
  }
}

void BpeModel::merge_word(const std::string& w, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;
    int prev, next;
    size_t len;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(w.size());
  auto add = [&](int32_t id, size_t len) {
    const int n = static_cast<int>(symbols.size());
    if (n > 0) symbols[n - 1].next = n;
    symbols.push_back({id, n - 1, -1, len});
  };

  // Initial symbols: one per character (or its byte tokens / unk).
  bool pending_unk = false;
  int32_t unk_id = -1;
  size_t unk_len = 0;
  std::string s;
  for (size_t i = 0; i < w.size();) {
    const size_t char_len = std::min(utf8_len(static_cast<unsigned char>(w[i])), w.size() - i);
    const bool is_first = i == 0, is_last = i + char_len == w.size();
    s.clear();
    if (!is_first && has_prefix_) s += prefix_;
    s.append(w, i, char_len);
    if (is_last && has_suffix_) s += suffix_;
    i += char_len;

    const int32_t id = token_to_id(s);
    if (id >= 0) {
      if (pending_unk) {
        add(unk_id, unk_len);
        pending_unk = false;
      }
      add(id, char_len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char b : s) all = all && byte_ids_[b] >= 0;
      if (all) {
        // HF adds the byte tokens without flushing a pending unk first.
        for (unsigned char b : s) add(byte_ids_[b], 1);
        continue;
      }
    }
    if (has_unk_) {
      const int32_t uid = token_to_id(unk_token_);
      if (uid < 0) fail("model: unk_token '" + unk_token_ + "' is not in the vocabulary");
      if (pending_unk && fuse_unk_) {
        unk_len += char_len;
      } else {
        if (pending_unk) add(unk_id, unk_len);
        unk_id = uid;
        unk_len = char_len;
        pending_unk = true;
      }
    }
    // Without an unk token the character is dropped, as in HF.
  }
  if (pending_unk) add(unk_id, unk_len);

  // Merge by priority: lowest rank first, then leftmost position.
  struct Merge {
    size_t pos;
    uint32_t rank;
    int32_t new_id;
    bool operator<(const Merge& o) const {  // "less" = lower priority for std::priority_queue
      if (rank != o.rank) return rank > o.rank;
      return pos > o.pos;
    }
  };
  std::priority_queue<Merge> queue;
  auto lookup = [&](int32_t a, int32_t b) -> const std::pair<uint32_t, int32_t>* {
    const auto it = merges_.find(pair_key(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t i = 0; i + 1 < symbols.size(); ++i) {
    if (const auto* m = lookup(symbols[i].id, symbols[i + 1].id)) queue.push({i, m->first, m->second});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const size_t next_pos = static_cast<size_t>(cur.next);
    const Symbol right = symbols[next_pos];
    const auto* m = lookup(cur.id, right.id);
    if (!m || m->second != top.new_id) continue;  // stale entry

    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next >= 0 && static_cast<size_t>(right.next) < symbols.size())
      symbols[static_cast<size_t>(right.next)].prev = static_cast<int>(top.pos);

    if (cur.prev >= 0) {
      const Symbol& prev = symbols[static_cast<size_t>(cur.prev)];
      if (const auto* pm = lookup(prev.id, cur.id))
        queue.push({static_cast<size_t>(cur.prev), pm->first, pm->second});
    }
    if (cur.next >= 0 && static_cast<size_t>(cur.next) < symbols.size()) {
      const Symbol& nxt = symbols[static_cast<size_t>(cur.next)];
      if (const auto* nm = lookup(cur.id, nxt.id)) queue.push({top.pos, nm->first, nm->second});
    }
  }
  for (const auto& sym : symbols)
    if (sym.len != 0) out.push_back(sym.id);
}

}  // namespace edgeloop::detail
