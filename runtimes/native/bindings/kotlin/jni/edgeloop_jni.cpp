// JNI glue of the Kotlin binding (bindings/kotlin/src/dev/edgeloop/Edgeloop.kt) over the C API.
// A handle (jlong) owns one el_model and one el_session. Strings cross as UTF-16 (NewString /
// GetStringChars), never as JNI's modified UTF-8, so characters outside the BMP survive.
// Failures become dev.edgeloop.EdgeloopException(status, el_last_error()).
#include <jni.h>

#include <cmath>
#include <string>
#include <vector>

#include "edgeloop.h"

namespace {

struct Handle {
  el_model* model = nullptr;
  el_session* session = nullptr;
};

Handle* from(jlong h) { return reinterpret_cast<Handle*>(static_cast<intptr_t>(h)); }

std::string to_utf8(JNIEnv* env, jstring s) {
  std::string out;
  if (!s) return out;
  const jsize n = env->GetStringLength(s);
  const jchar* c = env->GetStringChars(s, nullptr);
  if (!c) return out;
  for (jsize i = 0; i < n; ++i) {
    uint32_t cp = c[i];
    if (cp >= 0xD800 && cp < 0xDC00 && i + 1 < n && c[i + 1] >= 0xDC00 && c[i + 1] < 0xE000) {
      cp = 0x10000 + ((cp - 0xD800) << 10) + (c[i + 1] - 0xDC00);
      ++i;
    } else if (cp >= 0xD800 && cp < 0xE000) {
      cp = 0xFFFD;  // a lone surrogate
    }
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  env->ReleaseStringChars(s, c);
  return out;
}

jstring to_jstring(JNIEnv* env, const char* s, size_t n) {
  std::vector<jchar> u;
  u.reserve(n);
  const auto* b = reinterpret_cast<const unsigned char*>(s);
  for (size_t i = 0; i < n;) {
    uint32_t cp = 0xFFFD;
    size_t len = 1;
    if (b[i] < 0x80) cp = b[i];
    else if ((b[i] & 0xE0) == 0xC0 && i + 1 < n) cp = (b[i] & 0x1F) << 6 | (b[i + 1] & 0x3F), len = 2;
    else if ((b[i] & 0xF0) == 0xE0 && i + 2 < n) cp = (b[i] & 0x0F) << 12 | (b[i + 1] & 0x3F) << 6 | (b[i + 2] & 0x3F), len = 3;
    else if ((b[i] & 0xF8) == 0xF0 && i + 3 < n)
      cp = (b[i] & 0x07) << 18 | (b[i + 1] & 0x3F) << 12 | (b[i + 2] & 0x3F) << 6 | (b[i + 3] & 0x3F), len = 4;
    i += len;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      u.push_back(static_cast<jchar>(0xD800 + (cp >> 10)));
      u.push_back(static_cast<jchar>(0xDC00 + (cp & 0x3FF)));
    } else {
      u.push_back(static_cast<jchar>(cp));
    }
  }
  return env->NewString(u.data(), static_cast<jsize>(u.size()));
}

void throw_status(JNIEnv* env, el_status status, const std::string& message) {
  if (env->ExceptionCheck()) return;  // a Java exception (from a callback) is already pending
  jclass cls = env->FindClass("dev/edgeloop/EdgeloopException");
  if (!cls) return;
  jmethodID ctor = env->GetMethodID(cls, "<init>", "(ILjava/lang/String;)V");
  jstring msg = to_jstring(env, message.data(), message.size());
  auto* e = static_cast<jthrowable>(env->NewObject(cls, ctor, static_cast<jint>(status), msg));
  if (e) env->Throw(e);
}

void throw_last(JNIEnv* env, el_status status) { throw_status(env, status, el_last_error()); }

Handle* live(JNIEnv* env, jlong h) {
  Handle* handle = from(h);
  if (!handle) throw_status(env, EL_ERR_INVALID_ARGUMENT, "the model is closed");
  return handle;
}

struct Stream {
  JNIEnv* env;
  jobject sink;
  jmethodID on_piece;
};

int on_token(el_token, const char* piece, size_t len, void* user) {
  auto* s = static_cast<Stream*>(user);
  jstring text = to_jstring(s->env, piece, len);
  const jboolean go_on = s->env->CallBooleanMethod(s->sink, s->on_piece, text);
  s->env->DeleteLocalRef(text);
  if (s->env->ExceptionCheck()) return 1;  // the callback threw: cancel, rethrown on return
  return go_on ? 0 : 1;
}

}  // namespace

extern "C" {

JNIEXPORT jstring JNICALL Java_dev_edgeloop_EdgeloopModel_version(JNIEnv* env, jclass) {
  const char* v = el_version();
  return to_jstring(env, v, std::char_traits<char>::length(v));
}

JNIEXPORT jlong JNICALL Java_dev_edgeloop_EdgeloopModel_nativeOpen(JNIEnv* env, jclass, jstring path, jint threads,
                                                                   jstring exit_policy, jint max_loops,
                                                                   jstring library_path) {
  const std::string p = to_utf8(env, path), library = to_utf8(env, library_path);
  el_model_params mp = el_model_default_params();
  mp.n_threads = threads;
  mp.library_path = library_path ? library.c_str() : nullptr;
  auto* h = new Handle;
  el_status st = el_model_load(p.c_str(), mp, &h->model);
  if (st == EL_OK) {
    el_session_params sp = el_session_default_params();
    const std::string policy = to_utf8(env, exit_policy);
    sp.exit_policy = exit_policy ? policy.c_str() : nullptr;
    sp.max_loops = max_loops;
    st = el_session_create(h->model, sp, &h->session);
  }
  if (st != EL_OK) {
    throw_last(env, st);
    el_model_free(h->model);
    delete h;
    return 0;
  }
  return static_cast<jlong>(reinterpret_cast<intptr_t>(h));
}

JNIEXPORT void JNICALL Java_dev_edgeloop_EdgeloopModel_nativeClose(JNIEnv*, jclass, jlong handle) {
  Handle* h = from(handle);
  if (!h) return;
  el_session_free(h->session);
  el_model_free(h->model);
  delete h;
}

JNIEXPORT jintArray JNICALL Java_dev_edgeloop_EdgeloopModel_nativeInfo(JNIEnv* env, jclass, jlong handle) {
  Handle* h = live(env, handle);
  if (!h) return nullptr;
  const jint info[3] = {el_model_n_vocab(h->model), el_model_n_ctx(h->model), el_model_n_loops(h->model)};
  jintArray out = env->NewIntArray(3);
  env->SetIntArrayRegion(out, 0, 3, info);
  return out;
}

JNIEXPORT void JNICALL Java_dev_edgeloop_EdgeloopModel_nativeCancel(JNIEnv*, jclass, jlong handle) {
  if (Handle* h = from(handle)) el_session_cancel(h->session);
}

JNIEXPORT jintArray JNICALL Java_dev_edgeloop_EdgeloopModel_nativeTokenize(JNIEnv* env, jclass, jlong handle,
                                                                          jstring text, jboolean add_special) {
  Handle* h = live(env, handle);
  if (!h) return nullptr;
  const std::string t = to_utf8(env, text);
  const int32_t n = el_tokenize(h->model, t.data(), t.size(), add_special, nullptr, 0);
  if (n < 0) return throw_last(env, static_cast<el_status>(-n)), nullptr;
  std::vector<el_token> ids(static_cast<size_t>(n));
  el_tokenize(h->model, t.data(), t.size(), add_special, ids.data(), n);
  jintArray out = env->NewIntArray(n);
  env->SetIntArrayRegion(out, 0, n, ids.data());
  return out;
}

JNIEXPORT jstring JNICALL Java_dev_edgeloop_EdgeloopModel_nativeDetokenize(JNIEnv* env, jclass, jlong handle,
                                                                          jintArray tokens, jboolean skip_special) {
  Handle* h = live(env, handle);
  if (!h) return nullptr;
  const jsize n = env->GetArrayLength(tokens);
  std::vector<el_token> ids(static_cast<size_t>(n));
  env->GetIntArrayRegion(tokens, 0, n, ids.data());
  const int32_t len = el_detokenize(h->model, ids.data(), n, skip_special, nullptr, 0);
  if (len < 0) return throw_last(env, static_cast<el_status>(-len)), nullptr;
  std::string text(static_cast<size_t>(len) + 1, '\0');
  el_detokenize(h->model, ids.data(), n, skip_special, &text[0], text.size());
  return to_jstring(env, text.data(), static_cast<size_t>(len));
}

JNIEXPORT jobject JNICALL Java_dev_edgeloop_EdgeloopModel_nativeGenerate(JNIEnv* env, jclass, jlong handle,
                                                                        jstring prompt, jintArray ints,
                                                                        jdoubleArray doubles, jlong seed,
                                                                        jobjectArray stop, jobject sink) {
  Handle* h = live(env, handle);
  if (!h) return nullptr;
  jint iv[4];
  jdouble dv[4];
  env->GetIntArrayRegion(ints, 0, 4, iv);
  env->GetDoubleArrayRegion(doubles, 0, 4, dv);
  const jint set = iv[3], flags = iv[2];
  el_generation_params p = el_generation_default_params(h->model);
  if (set & 1) p.max_new_tokens = iv[0];
  if (set & 2) p.top_k = iv[1];
  if (set & 4) p.temperature = dv[0];
  if (set & 8) p.top_p = dv[1];
  if (set & 16) p.min_p = dv[2];
  if (set & 32) p.repetition_penalty = dv[3];
  if (set & 64) p.seed = static_cast<uint64_t>(seed), p.has_seed = true;
  p.ignore_eos = flags & 1;
  p.truncate = flags & 2;
  p.reuse_prefix = flags & 4;
  std::vector<std::string> stops;
  for (jsize i = 0, n = env->GetArrayLength(stop); i < n; ++i) {
    auto s = static_cast<jstring>(env->GetObjectArrayElement(stop, i));
    stops.push_back(to_utf8(env, s));
    env->DeleteLocalRef(s);
  }
  std::vector<const char*> stop_ptrs;
  for (const auto& s : stops) stop_ptrs.push_back(s.c_str());
  p.stop = stop_ptrs.data();
  p.n_stop = stop_ptrs.size();

  Stream stream{env, sink, env->GetMethodID(env->GetObjectClass(sink), "onPiece", "(Ljava/lang/String;)Z")};
  if (!stream.on_piece) return nullptr;  // NoSuchMethodError pending
  const std::string text = to_utf8(env, prompt);
  el_generation_result r;
  const el_status st = el_generate(h->session, text.c_str(), &p, on_token, &stream, &r);
  if (env->ExceptionCheck()) return nullptr;  // the callback threw: let it propagate
  if (st != EL_OK && st != EL_ERR_CANCELLED) return throw_last(env, st), nullptr;

  const int32_t n = el_session_tokens(h->session, nullptr, nullptr, 0);
  std::vector<el_token> tokens(static_cast<size_t>(n));
  std::vector<int32_t> depths(static_cast<size_t>(n));
  el_session_tokens(h->session, tokens.data(), depths.data(), n);
  std::string out(static_cast<size_t>(el_session_text(h->session, nullptr, 0)) + 1, '\0');
  el_session_text(h->session, &out[0], out.size());
  out.pop_back();
  jintArray jt = env->NewIntArray(n), jd = env->NewIntArray(n);
  env->SetIntArrayRegion(jt, 0, n, tokens.data());
  env->SetIntArrayRegion(jd, 0, n, depths.data());
  jclass cls = env->FindClass("dev/edgeloop/GenerationResult");
  if (!cls) return nullptr;
  jmethodID ctor = env->GetMethodID(cls, "<init>", "(Ljava/lang/String;[I[ILjava/lang/String;IDDDJ)V");
  if (!ctor) return nullptr;
  const char* reason = el_finish_reason_name(r.finish_reason);
  return env->NewObject(cls, ctor, to_jstring(env, out.data(), out.size()), jt, jd,
                        to_jstring(env, reason, std::char_traits<char>::length(reason)), r.n_prompt_tokens,
                        r.prefill_seconds, r.decode_tokens_per_second, r.mean_loops, static_cast<jlong>(r.seed));
}

}  // extern "C"
