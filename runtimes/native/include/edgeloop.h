/*
 * edgeloop.h - the C API of the edgeloop native runtime.
 *
 * Loads an edgeloop TVM CPU artifact (a directory made by `edgeloop compile --backend tvm`),
 * checks it (manifest format and version, the manifest digest, the JSON Schema, file-name
 * confinement, the size and sha256 of every file) and generates text with it: prefill and
 * decode over a KV cache the library owns, the portable sampler (the same tokens as the Python
 * runtime for the same seed), stop strings, streaming, early exit at loop boundaries.
 *
 * Conventions (the shape of llama.cpp's llama.h):
 *   - Opaque handles made and released in pairs: el_model_load / el_model_free,
 *     el_session_create / el_session_free, el_sampler_create / el_sampler_free,
 *     el_detokenizer_create / el_detokenizer_free. Every *_free accepts NULL.
 *   - Parameters are plain structs; get one from el_*_default_params() and change fields.
 *   - Functions that can fail return an el_status. On failure el_last_error() gives one line
 *     saying what went wrong and what to do; it is thread-local and stays valid until the next
 *     failing call on the same thread. Each function says what state remains after a failure.
 *   - Functions that fill a caller's buffer return the size they need (like snprintf): call
 *     once with a small or NULL buffer, allocate, call again. A negative return is -el_status.
 *   - The library never prints and never calls exit() or abort() on bad input: diagnostics go
 *     to the log callback (el_set_log_callback), errors to the return value.
 *   - Strings are UTF-8. Memory the library returns through `const char*` is owned by the
 *     library unless a comment says otherwise; the caller never frees it.
 *   - Threads: an el_model may be shared by sessions on several threads (calls into the model
 *     are serialized inside); an el_session, el_sampler or el_detokenizer is used by one thread
 *     at a time, except el_session_cancel, which any thread may call.
 */
#ifndef EDGELOOP_H
#define EDGELOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(EDGELOOP_SHARED)
#  if defined(_WIN32)
#    if defined(EDGELOOP_BUILD)
#      define EL_API __declspec(dllexport)
#    else
#      define EL_API __declspec(dllimport)
#    endif
#  else
#    define EL_API __attribute__((visibility("default")))
#  endif
#else
#  define EL_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define EL_API_VERSION 1      /* bumped when a declaration below changes incompatibly */
#define EL_TOKEN_NONE (-1)    /* "no token": no BOS, or the final piece of el_generate */

typedef int32_t el_token;

/* ------------------------------------------------------------------------------------------
 * Status codes. Values are stable; new codes are only ever added at the end.
 * ---------------------------------------------------------------------------------------- */
typedef enum el_status {
    EL_OK = 0,
    EL_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, an out-of-range option or token, invalid UTF-8 */
    EL_ERR_IO = 2,               /* a path or a file of the artifact cannot be found or read */
    EL_ERR_CORRUPT_ARTIFACT = 3, /* the manifest is not valid JSON / does not match the schema /
                                    names a file outside the artifact; a file is damaged */
    EL_ERR_CHECKSUM = 4,         /* a file's size or sha256, or the manifest digest, does not match */
    EL_ERR_VERSION = 5,          /* the artifact's format version is not this library's (compile again
                                    or upgrade) */
    EL_ERR_CONTEXT_FULL = 6,     /* the tokens do not fit in the model's context */
    EL_ERR_TVM = 7,              /* the TVM runtime failed (loading the library, running a function) */
    EL_ERR_CANCELLED = 8,        /* the stream callback returned nonzero, or el_session_cancel was called */
    EL_ERR_NO_MEMORY = 9,        /* an allocation failed */
    EL_ERR_UNSUPPORTED = 10,     /* the artifact or option needs something this build lacks (a GPU
                                    target, an ONNX artifact, early exit without a host-driven loop) */
    EL_ERR_INTERNAL = 11         /* a bug: please report it with el_last_error() */
} el_status;

typedef enum el_log_level {
    EL_LOG_DEBUG = 0,
    EL_LOG_INFO = 1,
    EL_LOG_WARN = 2,
    EL_LOG_ERROR = 3
} el_log_level;

typedef enum el_finish_reason {
    EL_FINISH_NONE = 0,      /* not finished (no generation yet, or it failed) */
    EL_FINISH_EOS = 1,       /* the model produced an end-of-sequence token (not part of the output) */
    EL_FINISH_LENGTH = 2,    /* max_new_tokens reached */
    EL_FINISH_STOP = 3,      /* a stop string appeared (it and what follows are not part of the output) */
    EL_FINISH_CONTEXT = 4,   /* the context is full */
    EL_FINISH_CANCELLED = 5  /* cancelled by the callback or el_session_cancel */
} el_finish_reason;

typedef struct el_model el_model;             /* a loaded artifact: weights, tokenizer, contract */
typedef struct el_session el_session;         /* one sequence: its KV cache and last generation */
typedef struct el_sampler el_sampler;         /* the portable sampler with its own RNG */
typedef struct el_detokenizer el_detokenizer; /* token ids -> UTF-8 pieces, never splitting a character */

/* ------------------------------------------------------------------------------------------
 * Library
 * ---------------------------------------------------------------------------------------- */

/* "0.1.0 (artifact format 2)"; static storage. */
EL_API const char *el_version(void);

/* "EL_ERR_CHECKSUM", ...; static storage; "EL_ERR_UNKNOWN" for values not listed above. */
EL_API const char *el_status_name(el_status status);

/* "eos", "length", "stop", "context", "cancelled" (the names Python's finish_reason uses); "" for
 * EL_FINISH_NONE and values not listed above; static storage. */
EL_API const char *el_finish_reason_name(el_finish_reason reason);

/* One line describing the last failure on this thread ("" if none). Valid until the next failing
 * call on this thread; copy it to keep it. */
EL_API const char *el_last_error(void);

/* Receives every diagnostic the library has (load times, warnings). `message` is valid during
 * the call only. The callback may run on any thread that calls into the library; it must not
 * call back into the library. NULL (the default) discards messages. Not thread-safe with
 * respect to concurrent calls of el_set_log_callback itself. */
typedef void (*el_log_callback)(el_log_level level, const char *message, void *user_data);
EL_API void el_set_log_callback(el_log_callback callback, void *user_data);

/* ------------------------------------------------------------------------------------------
 * Model
 * ---------------------------------------------------------------------------------------- */

typedef struct el_model_params {
    int32_t n_threads;        /* TVM worker threads; 0 = TVM's default (TVM_NUM_THREADS, else the
                                 cores). The TVM thread pool is process-wide: the last load wins. */
    bool verify_checksums;    /* check the size and sha256 of every file before loading (default
                                 true). The manifest's own digest, schema and names are always
                                 checked. */
    const char *library_path; /* NULL: the artifact's tvm.library. Else a shared library the app
                                 linked from it (Android: model.tar linked by the NDK into
                                 libmodel.so, docs/native.md); the artifact's own library file is
                                 then neither opened nor verified. Copied during the call. */
} el_model_params;

EL_API el_model_params el_model_default_params(void);

/* Loads the artifact directory `path`. Checks, in order, before anything else is opened: the
 * manifest (EL_ERR_IO if missing; EL_ERR_VERSION for another format version; EL_ERR_CHECKSUM if
 * its digest does not match; EL_ERR_CORRUPT_ARTIFACT for JSON, schema or consistency errors and
 * for file names that are not plain names inside the artifact); then every file's size and
 * sha256 (EL_ERR_CHECKSUM, EL_ERR_IO if one is missing); then the tokenizer, the TVM library and
 * params (EL_ERR_TVM, EL_ERR_CORRUPT_ARTIFACT). Artifacts for a GPU or of the ONNX backend:
 * EL_ERR_UNSUPPORTED.
 * On success *out_model owns everything; release it with el_model_free once every session of it
 * is freed. On failure *out_model is set to NULL and nothing stays allocated. */
EL_API el_status el_model_load(const char *path, el_model_params params, el_model **out_model);

/* Frees the model. Every session made from it must be freed first. NULL is a no-op. */
EL_API void el_model_free(el_model *model);

EL_API int32_t el_model_n_vocab(const el_model *model);   /* logits per token */
EL_API int32_t el_model_n_ctx(const el_model *model);     /* positions a session can hold */
EL_API int32_t el_model_n_loops(const el_model *model);   /* B: passes of the looped block */
EL_API bool el_model_has_host_loop(const el_model *model);  /* early exit is possible */
EL_API bool el_model_has_tokenizer(const el_model *model);
EL_API el_token el_model_bos(const el_model *model);      /* EL_TOKEN_NONE when the model has none */
EL_API bool el_model_is_eos(const el_model *model, el_token token);

/* The artifact's default exit policy ("none" when it has none), like snprintf: writes at most
 * `len` bytes including a terminating NUL and returns the full length (without the NUL). */
EL_API int32_t el_model_exit_policy(const el_model *model, char *buf, size_t len);

/* ------------------------------------------------------------------------------------------
 * Tokens
 * ---------------------------------------------------------------------------------------- */

/* UTF-8 `text` (text_len bytes; it may hold NULs) -> token ids, as the Python runtime's
 * Tokenizer.encode: with `add_special`, the BOS token is prepended when the artifact's tokenizer
 * section says add_bos. Returns the number of tokens; writes min(that, n_tokens_max) of them.
 * Negative: -EL_ERR_INVALID_ARGUMENT (invalid UTF-8, no tokenizer), see el_last_error(). */
EL_API int32_t el_tokenize(const el_model *model, const char *text, size_t text_len, bool add_special,
                           el_token *tokens, int32_t n_tokens_max);

/* Token ids -> UTF-8 text (HF decode; special tokens dropped when skip_special). Like snprintf:
 * returns the full length in bytes (without the NUL) and writes at most `len` bytes including a
 * terminating NUL (nothing when len is 0). Negative: -el_status (an id outside the vocabulary). */
EL_API int32_t el_detokenize(const el_model *model, const el_token *tokens, int32_t n_tokens, bool skip_special,
                             char *buf, size_t len);

/* The text of one token (decode of [token] with special tokens kept; a byte token that is not a
 * whole character gives U+FFFD: stream with el_detokenizer instead). Same return as el_detokenize. */
EL_API int32_t el_token_to_piece(const el_model *model, el_token token, char *buf, size_t len);

/* An incremental detokenizer: push ids one at a time and get the text they complete, never
 * splitting a UTF-8 character. The model must outlive it. */
EL_API el_status el_detokenizer_create(const el_model *model, el_detokenizer **out);
EL_API void el_detokenizer_free(el_detokenizer *detokenizer);

/* *piece (NUL-terminated, *piece_len bytes, possibly empty) is owned by the detokenizer and valid
 * until its next call. After a failure (an unknown id) the detokenizer is unchanged. */
EL_API el_status el_detokenizer_push(el_detokenizer *detokenizer, el_token token, const char **piece,
                                     size_t *piece_len);
/* The rest of the text at the end of a stream (an incomplete character becomes U+FFFD). */
EL_API el_status el_detokenizer_flush(el_detokenizer *detokenizer, const char **piece, size_t *piece_len);

/* ------------------------------------------------------------------------------------------
 * Generation options and the sampler (docs/sampling.md)
 * ---------------------------------------------------------------------------------------- */

typedef struct el_generation_params {
    int32_t max_new_tokens;    /* [0, 2^20] */
    double temperature;        /* 0 = greedy, else [0.001, 100] */
    int32_t top_k;             /* >= 0; 0 = off */
    double top_p;              /* (0, 1]; 1 = off */
    double min_p;              /* [0, 1); 0 = off */
    double repetition_penalty; /* (0, 100]; 1 = off; applies to the prompt and the output */
    uint64_t seed;             /* the RNG seed, when has_seed */
    bool has_seed;             /* false: a random seed, reported in el_generation_result.seed */
    const char *const *stop;   /* n_stop stop strings (UTF-8); read during el_generate only */
    size_t n_stop;
    bool ignore_eos;           /* keep generating after an end-of-sequence token */
    bool truncate;             /* a prompt that does not fit: keep its last tokens instead of failing
                                  with EL_ERR_CONTEXT_FULL */
    bool reuse_prefix;         /* keep the session's KV for the longest common token prefix of its
                                  cached tokens and this prompt, and feed only the rest (chat turns).
                                  false: the session is reset first. */
} el_generation_params;

/* The library's defaults (64 new tokens, greedy, random seed) under the model's own generation
 * defaults (generation_config.json: do_sample with temperature / top_k / top_p, and
 * repetition_penalty, max_new_tokens), as the Python runtime's GenerationConfig.from_defaults.
 * `model` may be NULL: the library's defaults. */
EL_API el_generation_params el_generation_default_params(const el_model *model);

/* EL_OK, or EL_ERR_INVALID_ARGUMENT with the first bad option in el_last_error() (NaN, infinities,
 * out-of-range values, a NULL stop string), as GenerationConfig.validate. */
EL_API el_status el_generation_params_check(const el_generation_params *params);

/* A sampler for the sampling fields of `params` (checked as above; on failure *out is NULL). */
EL_API el_status el_sampler_create(const el_generation_params *params, el_sampler **out);
EL_API void el_sampler_free(el_sampler *sampler);
EL_API uint64_t el_sampler_seed(const el_sampler *sampler); /* the seed in use (a random one if unset) */

/* The next token for `logits` [n_vocab] given the history (prompt and output so far, for the
 * repetition penalty). Returns the token id, or -EL_ERR_INVALID_ARGUMENT for non-finite logits
 * or a history id outside [0, n_vocab) (the RNG is then not advanced). */
EL_API el_token el_sampler_sample(el_sampler *sampler, const float *logits, int32_t n_vocab,
                                  const el_token *history, size_t n_history);

/* ------------------------------------------------------------------------------------------
 * Sessions: one sequence and its KV cache
 * ---------------------------------------------------------------------------------------- */

typedef struct el_session_params {
    const char *exit_policy; /* NULL: the artifact's default policy (exit.policy, else "none").
                                "none": every token runs all passes through the fused functions.
                                "confidence:TAU", "agreement[:N]", "entropy:MAX", "kl:MAX",
                                "gate[:T]", "depth:D": tokens leave the loop early (the host-driven
                                loop; docs/early-exit.md). Copied during the call. */
    int32_t max_loops;       /* 0: all passes; N: at most N passes per token (host-driven loop) */
} el_session_params;

EL_API el_session_params el_session_default_params(void);

/* A new, empty session of `model` (which must outlive it). EL_ERR_INVALID_ARGUMENT for a bad
 * policy; EL_ERR_UNSUPPORTED when the policy needs a host-driven loop the model lacks, or for
 * "speculate" (not in the native runtime yet). On failure *out is NULL. */
EL_API el_status el_session_create(el_model *model, el_session_params params, el_session **out);
EL_API void el_session_free(el_session *session);

EL_API int32_t el_session_n_past(const el_session *session); /* tokens in the KV cache */

/* The resolved exit policy ("none", "confidence:0.9", ...), like snprintf. */
EL_API int32_t el_session_exit_policy(const el_session *session, char *buf, size_t len);

/* Keeps the first n_keep tokens of the KV cache (0 = reset). n_keep >= n_past is a no-op.
 * EL_ERR_TVM leaves the session unusable: free it or reset it again. */
EL_API el_status el_session_rewind(el_session *session, int32_t n_keep);

/* Appends `tokens` to the sequence and writes the logits of the last one (or, with all_logits, of
 * every one: n_tokens x n_vocab floats, row-major) into `logits`, which holds `n_logits` floats
 * (NULL with n_logits 0: no logits wanted). `depth` (nullable) gets the passes the last token ran.
 * A single token runs under the session's exit policy; several tokens (a prompt) run every pass.
 * Failures: EL_ERR_INVALID_ARGUMENT (an id outside the vocabulary, logits too small) and
 * EL_ERR_CONTEXT_FULL (n_past + n_tokens > n_ctx) change nothing; after EL_ERR_TVM rewind or free
 * the session. */
EL_API el_status el_session_decode(el_session *session, const el_token *tokens, int32_t n_tokens, bool all_logits,
                                   float *logits, size_t n_logits, int32_t *depth);

/* Statistics of one generation. */
typedef struct el_generation_result {
    el_finish_reason finish_reason;
    int32_t n_prompt_tokens;    /* after truncation */
    int32_t n_dropped_tokens;   /* prompt tokens left out by `truncate` */
    int32_t n_generated;        /* new tokens (an EOS that ended the run is not counted) */
    double prefill_seconds;     /* time to first token */
    double decode_seconds;      /* from the first to the last new token */
    double decode_tokens_per_second;  /* (n_generated - 1) / decode_seconds */
    double mean_loops;          /* mean passes per new token */
    uint64_t seed;              /* the seed the sampler used */
} el_generation_result;

/* Called for every new token with the text it completes (`piece`, piece_len bytes, NUL-terminated,
 * possibly empty: text is held back while it might be the start of a stop string or an
 * incomplete character), and once more at the end with token EL_TOKEN_NONE if text remains.
 * `piece` is valid during the call only. Return 0 to go on, nonzero to cancel. The pieces
 * concatenate to the generated text. */
typedef int (*el_token_callback)(el_token token, const char *piece, size_t piece_len, void *user_data);

/* Generates after `prompt` (UTF-8, tokenized with add_special) on `session`: one call for the
 * whole of Python's Model.generate. `callback` and `result` may be NULL. The session keeps the
 * prompt and the output in its KV cache (and el_session_text / el_session_tokens give them).
 * Returns EL_OK when the generation finished (see result->finish_reason); EL_ERR_CANCELLED when
 * the callback asked (the output so far is kept, finish_reason EL_FINISH_CANCELLED);
 * EL_ERR_INVALID_ARGUMENT for bad params or an empty prompt of a model without BOS;
 * EL_ERR_CONTEXT_FULL for a prompt of n_ctx tokens or more without `truncate` (nothing changed);
 * EL_ERR_TVM (rewind or free the session). */
EL_API el_status el_generate(el_session *session, const char *prompt, const el_generation_params *params,
                             el_token_callback callback, void *user_data, el_generation_result *result);

/* The same from token ids (Python's Model.generate_tokens); pieces are given when the model has a
 * tokenizer (stop strings need one). */
EL_API el_status el_generate_tokens(el_session *session, const el_token *prompt, int32_t n_prompt,
                                    const el_generation_params *params, el_token_callback callback,
                                    void *user_data, el_generation_result *result);

/* Cancels the el_generate running on `session` (from any thread, or from its callback): it stops
 * before its next token and returns EL_ERR_CANCELLED. A cancel that arrives while no generation
 * runs is ignored. */
EL_API void el_session_cancel(el_session *session);

/* The last generation's text (like snprintf) and its tokens with the passes each ran (returns
 * the count; writes min(count, n_max) entries; either array may be NULL). */
EL_API int32_t el_session_text(const el_session *session, char *buf, size_t len);
EL_API int32_t el_session_tokens(const el_session *session, el_token *tokens, int32_t *depths, int32_t n_max);

#ifdef __cplusplus
}
#endif

#endif /* EDGELOOP_H */
