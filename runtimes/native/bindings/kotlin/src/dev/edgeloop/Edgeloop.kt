// Kotlin binding of the edgeloop native runtime (include/edgeloop.h) over JNI (jni/edgeloop_jni.cpp).
//
//     EdgeloopModel("/data/local/tmp/kjv-art").use { model ->
//         val text = model.generate("And God said", GenerationConfig(maxNewTokens = 64, temperature = 0.8, seed = 1)) {
//             piece -> print(piece)       // streamed as it is generated; model.cancel() stops it
//         }
//     }
//
// Written for Kotlin 1.3 and up (Android and the JVM): the model is a java.io.Closeable, so `use`
// works without kotlin-stdlib-jdk7. The native library is libedgeloop_jni (System.loadLibrary).
package dev.edgeloop

import java.io.Closeable

/** A failure of the native library: [status] is an el_status value, [statusName] its name. */
class EdgeloopException(val status: Int, message: String) : RuntimeException(message) {
    val statusName: String
        get() = STATUS_NAMES.getOrElse(status) { "EL_ERR_UNKNOWN" }

    companion object {
        const val INVALID_ARGUMENT = 1
        const val IO = 2
        const val CORRUPT_ARTIFACT = 3
        const val CHECKSUM = 4
        const val VERSION = 5
        const val CONTEXT_FULL = 6
        const val TVM = 7
        const val CANCELLED = 8
        const val NO_MEMORY = 9
        const val UNSUPPORTED = 10
        private val STATUS_NAMES = listOf(
            "EL_OK", "EL_ERR_INVALID_ARGUMENT", "EL_ERR_IO", "EL_ERR_CORRUPT_ARTIFACT", "EL_ERR_CHECKSUM",
            "EL_ERR_VERSION", "EL_ERR_CONTEXT_FULL", "EL_ERR_TVM", "EL_ERR_CANCELLED", "EL_ERR_NO_MEMORY",
            "EL_ERR_UNSUPPORTED", "EL_ERR_INTERNAL")
    }
}

/** Sampling and stopping options; null fields take the model's defaults (el_generation_default_params). */
data class GenerationConfig(
    val maxNewTokens: Int? = null,
    val temperature: Double? = null,       // 0 = greedy
    val topK: Int? = null,
    val topP: Double? = null,
    val minP: Double? = null,
    val repetitionPenalty: Double? = null,
    val seed: Long? = null,                // an unsigned 64-bit seed in a Long; null = random
    val stop: List<String> = emptyList(),
    val ignoreEos: Boolean = false,
    val truncate: Boolean = false,         // cut a prompt that does not fit instead of failing
    val reusePrefix: Boolean = false       // keep the KV of the common prefix with the previous call (chat)
)

/** One generation: its text, tokens, the loop passes each token ran, and statistics. */
class GenerationResult(
    val text: String,
    val tokens: IntArray,
    val depths: IntArray,
    val finishReason: String,              // eos, length, stop, context, cancelled
    val promptTokens: Int,
    val timeToFirstTokenSeconds: Double,
    val decodeTokensPerSecond: Double,
    val meanLoops: Double,
    val seed: Long
)

/**
 * A loaded artifact and one session on it. [exitPolicy]: null = the artifact's default, "none",
 * "confidence:0.9", "depth:2", ...; [maxLoops]: 0 = all passes; [libraryPath]: the model library
 * linked for this device from a cross-compiled artifact's model.tar (Android: the libmodel.so in
 * the app's nativeLibraryDir), null = the artifact's own model.so. Not thread-safe except [cancel].
 */
class EdgeloopModel @JvmOverloads constructor(
    path: String,
    threads: Int = 0,
    exitPolicy: String? = null,
    maxLoops: Int = 0,
    libraryPath: String? = null
) : Closeable {
    private var handle: Long = nativeOpen(path, threads, exitPolicy, maxLoops, libraryPath)
    @Volatile private var cancelRequested = false

    val vocabSize: Int get() = nativeInfo(live())[0]
    val contextSize: Int get() = nativeInfo(live())[1]
    val loops: Int get() = nativeInfo(live())[2]

    /** Generates after [prompt]; [onPiece] receives the text as it is completed. Returns the whole text. */
    @JvmOverloads
    fun generate(prompt: String, config: GenerationConfig = GenerationConfig(), onPiece: ((String) -> Unit)? = null): String =
        generateDetailed(prompt, config, onPiece).text

    /** As [generate], with tokens, depths and statistics. A [cancel] ends it early (finishReason "cancelled"). */
    @JvmOverloads
    fun generateDetailed(prompt: String, config: GenerationConfig = GenerationConfig(),
                         onPiece: ((String) -> Unit)? = null): GenerationResult {
        val h = live()
        cancelRequested = false
        var set = 0
        fun mark(bit: Int, present: Boolean) { if (present) set = set or bit }
        mark(1, config.maxNewTokens != null); mark(2, config.topK != null); mark(4, config.temperature != null)
        mark(8, config.topP != null); mark(16, config.minP != null); mark(32, config.repetitionPenalty != null)
        mark(64, config.seed != null)
        var flags = 0
        if (config.ignoreEos) flags = flags or 1
        if (config.truncate) flags = flags or 2
        if (config.reusePrefix) flags = flags or 4
        val ints = intArrayOf(config.maxNewTokens ?: 0, config.topK ?: 0, flags, set)
        val doubles = doubleArrayOf(config.temperature ?: 0.0, config.topP ?: 1.0, config.minP ?: 0.0,
                                    config.repetitionPenalty ?: 1.0)
        val sink = object : PieceSink {
            override fun onPiece(piece: String): Boolean {
                if (onPiece != null && piece.isNotEmpty()) onPiece(piece)
                return !cancelRequested
            }
        }
        return nativeGenerate(h, prompt, ints, doubles, config.seed ?: 0L, config.stop.toTypedArray(), sink)
    }

    /** Stops the running generation before its next token; safe from any thread and from onPiece. */
    fun cancel() {
        cancelRequested = true
        val h = handle
        if (h != 0L) nativeCancel(h)
    }

    fun tokenize(text: String, addSpecial: Boolean = true): IntArray = nativeTokenize(live(), text, addSpecial)

    fun detokenize(tokens: IntArray, skipSpecial: Boolean = true): String = nativeDetokenize(live(), tokens, skipSpecial)

    override fun close() {
        val h = handle
        handle = 0L
        if (h != 0L) nativeClose(h)
    }

    private fun live(): Long {
        check(handle != 0L) { "the model is closed" }
        return handle
    }

    internal interface PieceSink {
        fun onPiece(piece: String): Boolean  // false: cancel
    }

    companion object {
        init {
            System.loadLibrary("edgeloop_jni")
        }

        @JvmStatic external fun version(): String
        @JvmStatic private external fun nativeOpen(path: String, threads: Int, exitPolicy: String?, maxLoops: Int,
                                                   libraryPath: String?): Long
        @JvmStatic private external fun nativeClose(handle: Long)
        @JvmStatic private external fun nativeInfo(handle: Long): IntArray
        @JvmStatic private external fun nativeCancel(handle: Long)
        @JvmStatic private external fun nativeTokenize(handle: Long, text: String, addSpecial: Boolean): IntArray
        @JvmStatic private external fun nativeDetokenize(handle: Long, tokens: IntArray, skipSpecial: Boolean): String
        @JvmStatic private external fun nativeGenerate(handle: Long, prompt: String, ints: IntArray, doubles: DoubleArray,
                                                       seed: Long, stop: Array<String>, sink: PieceSink): GenerationResult
    }
}
