// edgeloop-cli: generate text with an edgeloop artifact through the C API (include/edgeloop.h).
//
//   edgeloop-cli ARTIFACT -p "prompt" [-n 64] [--temp 0.8] [--top-k K] [--top-p P] [--min-p P]
//                [--repeat-penalty R] [--seed S] [--stop STR]... [--exit POLICY] [--loops N]
//                [--threads N] [--ignore-eos] [--truncate] [--json] [--no-verify] [--library PATH]
//
// Streams the text to stdout as it is generated and prints timings to stderr (load time, time to
// first token, decode tokens/s, peak RSS). --json prints one JSON object to stdout at the end
// instead: text, tokens, per-token depths and the statistics. Exit status: 0 on success, 1 on a
// library error (its message on stderr), 2 on bad usage.
#include <sys/resource.h>

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "edgeloop.h"

namespace {

void usage() {
  std::fprintf(stderr,
               "usage: edgeloop-cli ARTIFACT -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--min-p P]\n"
               "                    [--repeat-penalty R] [--seed S] [--stop STR]... [--exit POLICY] [--loops N]\n"
               "                    [--threads N] [--ignore-eos] [--truncate] [--json] [--no-verify] [--library PATH]\n");
}

int stream_piece(el_token, const char* piece, size_t len, void*) {
  std::fwrite(piece, 1, len, stdout);
  std::fflush(stdout);
  return 0;
}

void json_string(std::string& out, const char* s, size_t n) {
  out += '"';
  for (size_t i = 0; i < n; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);  // UTF-8 passes through
    }
  }
  out += '"';
}

double peak_rss_mb() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;  // Linux: kilobytes
}

int error(const char* what, el_status st) {
  std::fprintf(stderr, "edgeloop-cli: %s: %s (%s)\n", what, el_last_error(), el_status_name(st));
  return 1;
}

bool parse_number(const char* s, double& out) {
  char* end = nullptr;
  out = std::strtod(s, &end);
  return end != s && *end == '\0';
}

}  // namespace

int main(int argc, char** argv) {
  const char* artifact = nullptr;
  const char* prompt = nullptr;
  const char* exit_policy = nullptr;
  const char* library = nullptr;
  std::vector<const char*> stops;
  bool json = false, verify = true, have_n = false, have_temp = false;
  double n_new = 0, temp = 0, top_k = -1, top_p = -1, min_p = -1, penalty = -1, loops = 0, threads = 0;
  uint64_t seed = 0;
  bool have_seed = false;
  bool ignore_eos = false, truncate = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "edgeloop-cli: %s needs a value\n", name);
        std::exit(2);
      }
      return argv[++i];
    };
    const auto number = [&](const char* name, double& out) {
      const char* v = value(name);
      if (!parse_number(v, out)) {
        std::fprintf(stderr, "edgeloop-cli: %s needs a number, got '%s'\n", name, v);
        std::exit(2);
      }
    };
    if (a == "-p" || a == "--prompt") prompt = value("--prompt");
    else if (a == "-n" || a == "--max-new-tokens") number("-n", n_new), have_n = true;
    else if (a == "--temp" || a == "--temperature") number("--temp", temp), have_temp = true;
    else if (a == "--top-k") number("--top-k", top_k);
    else if (a == "--top-p") number("--top-p", top_p);
    else if (a == "--min-p") number("--min-p", min_p);
    else if (a == "--repeat-penalty" || a == "--repetition-penalty") number("--repeat-penalty", penalty);
    else if (a == "--seed") {
      const char* v = value("--seed");
      char* end = nullptr;
      const unsigned long long s = std::strtoull(v, &end, 10);
      if (end == v || *end || *v == '-') {
        std::fprintf(stderr, "edgeloop-cli: --seed needs an integer in [0, 2^64 - 1]\n");
        return 2;
      }
      seed = s;
      have_seed = true;
    } else if (a == "--stop") stops.push_back(value("--stop"));
    else if (a == "--exit") exit_policy = value("--exit");
    else if (a == "--loops") number("--loops", loops);
    else if (a == "--threads" || a == "-t") number("--threads", threads);
    else if (a == "--ignore-eos") ignore_eos = true;
    else if (a == "--truncate") truncate = true;
    else if (a == "--json") json = true;
    else if (a == "--no-verify") verify = false;
    else if (a == "--library") library = value("--library");
    else if (a == "-h" || a == "--help") {
      usage();
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "edgeloop-cli: unknown option %s\n", a.c_str());
      usage();
      return 2;
    } else if (!artifact) artifact = argv[i];
    else {
      usage();
      return 2;
    }
  }
  if (!artifact || !prompt) {
    usage();
    return 2;
  }

  const auto t0 = std::chrono::steady_clock::now();
  el_model_params mp = el_model_default_params();
  mp.n_threads = static_cast<int32_t>(threads);
  mp.verify_checksums = verify;
  mp.library_path = library;
  el_model* model = nullptr;
  el_status st = el_model_load(artifact, mp, &model);
  if (st != EL_OK) return error("cannot load the artifact", st);
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  el_session_params sp = el_session_default_params();
  sp.exit_policy = exit_policy;
  sp.max_loops = static_cast<int32_t>(loops);
  el_session* session = nullptr;
  st = el_session_create(model, sp, &session);
  if (st != EL_OK) {
    el_model_free(model);
    return error("cannot create a session", st);
  }

  el_generation_params gp = el_generation_default_params(model);
  if (have_n) gp.max_new_tokens = static_cast<int32_t>(n_new);
  if (have_temp) gp.temperature = temp;
  if (top_k >= 0) gp.top_k = static_cast<int32_t>(top_k);
  if (top_p >= 0) gp.top_p = top_p;
  if (min_p >= 0) gp.min_p = min_p;
  if (penalty >= 0) gp.repetition_penalty = penalty;
  gp.has_seed = have_seed;
  gp.seed = seed;
  gp.stop = stops.data();
  gp.n_stop = stops.size();
  gp.ignore_eos = ignore_eos;
  gp.truncate = truncate;

  el_generation_result r;
  st = el_generate(session, prompt, &gp, json ? nullptr : stream_piece, nullptr, &r);
  if (st != EL_OK && st != EL_ERR_CANCELLED) {
    el_session_free(session);
    el_model_free(model);
    return error("generation failed", st);
  }
  char policy[128];
  el_session_exit_policy(session, policy, sizeof(policy));
  if (json) {
    const int32_t n = el_session_tokens(session, nullptr, nullptr, 0);
    std::vector<el_token> tokens(n);
    std::vector<int32_t> depths(n);
    el_session_tokens(session, tokens.data(), depths.data(), n);
    std::string text(static_cast<size_t>(el_session_text(session, nullptr, 0)), '\0');
    el_session_text(session, &text[0], text.size() + 1);
    std::string out = "{\"text\": ";
    json_string(out, text.data(), text.size());
    out += ", \"tokens\": [";
    for (int32_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(tokens[i]);
    out += "], \"depths\": [";
    for (int32_t i = 0; i < n; ++i) out += (i ? ", " : "") + std::to_string(depths[i]);
    char stats[512];
    std::snprintf(stats, sizeof(stats),
                  "], \"finish_reason\": \"%s\", \"prompt_tokens\": %d, \"new_tokens\": %d, \"seed\": %" PRIu64
                  ", \"load_s\": %.6f, \"time_to_first_token_s\": %.6f, \"decode_tok_s\": %.3f, \"mean_loops\": %.4f, "
                  "\"peak_rss_mb\": %.1f, \"exit\": ",
                  el_finish_reason_name(r.finish_reason), r.n_prompt_tokens, r.n_generated, r.seed, load_s, r.prefill_seconds,
                  r.decode_tokens_per_second, r.mean_loops, peak_rss_mb());
    out += stats;
    json_string(out, policy, std::strlen(policy));
    out += "}\n";
    std::fwrite(out.data(), 1, out.size(), stdout);
  } else {
    std::fputc('\n', stdout);
  }
  std::fprintf(stderr,
               "\nedgeloop-cli: load %.3f s | prompt %d tokens, time to first token %.3f s | %d tokens, decode "
               "%.2f tok/s | mean loops %.2f (exit %s) | finish %s | seed %" PRIu64 " | peak RSS %.1f MB\n",
               load_s, r.n_prompt_tokens, r.prefill_seconds, r.n_generated, r.decode_tokens_per_second, r.mean_loops,
               policy, el_finish_reason_name(r.finish_reason), r.seed, peak_rss_mb());
  el_session_free(session);
  el_model_free(model);
  return 0;
}
