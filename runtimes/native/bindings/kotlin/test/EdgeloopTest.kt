// The Kotlin binding's test on the JVM (run by tests/test_native_kotlin.py):
//   java -Djava.library.path=BUILD -cp edgeloop-test.jar dev.edgeloop.test.EdgeloopTestKt ARTIFACT PROMPT
// Prints one JSON object per line (greedy, sampled, early exit: text, tokens, depths) for the
// Python side to compare with its own runtime, then "ok"; a failed check throws (exit status 1).
package dev.edgeloop.test

import dev.edgeloop.EdgeloopException
import dev.edgeloop.EdgeloopModel
import dev.edgeloop.GenerationConfig
import dev.edgeloop.GenerationResult

fun quote(s: String): String {
    val b = StringBuilder("\"")
    for (c in s) {
        when {
            c == '"' -> b.append("\\\"")
            c == '\\' -> b.append("\\\\")
            c < ' ' || c.toInt() > 126 -> b.append(String.format("\\u%04x", c.toInt()))
            else -> b.append(c)
        }
    }
    return b.append('"').toString()
}

fun emit(name: String, r: GenerationResult) {
    println("{\"case\": ${quote(name)}, \"text\": ${quote(r.text)}, \"tokens\": ${r.tokens.joinToString(", ", "[", "]")}, " +
            "\"depths\": ${r.depths.joinToString(", ", "[", "]")}, \"finish\": ${quote(r.finishReason)}}")
}

fun expect(ok: Boolean, what: String) {
    if (!ok) throw AssertionError(what)
}

fun main(args: Array<String>) {
    val artifact = args[0]
    val prompt = args[1]

    EdgeloopModel(artifact).use { model ->
        expect(model.vocabSize == 4096 && model.loops == 4, "model info")
        val ids = model.tokenize(prompt)
        expect(model.detokenize(ids) == prompt, "tokenize round trip")

        // greedy, streamed: the pieces concatenate to the returned text
        val pieces = StringBuilder()
        val greedy = model.generateDetailed(prompt, GenerationConfig(maxNewTokens = 64, ignoreEos = true)) { pieces.append(it) }
        expect(pieces.toString() == greedy.text, "streamed pieces == text")
        expect(greedy.tokens.size == 64 && greedy.finishReason == "length", "greedy: 64 tokens")
        emit("greedy", greedy)
        expect(model.generate(prompt, GenerationConfig(maxNewTokens = 64, ignoreEos = true)) == greedy.text, "generate()")

        val sampled = model.generateDetailed(prompt, GenerationConfig(maxNewTokens = 64, temperature = 0.8, topP = 0.9,
                                                                       seed = 1L, ignoreEos = true))
        expect(sampled.seed == 1L, "seed reported")
        emit("sampled", sampled)

        // cancellation from the callback: the text so far is kept
        var count = 0
        val cancelled = model.generateDetailed(prompt, GenerationConfig(maxNewTokens = 64, ignoreEos = true)) {
            count += 1
            if (count == 3) model.cancel()
        }
        expect(cancelled.finishReason == "cancelled" && cancelled.tokens.size < 64, "cancel: " + cancelled.finishReason)
        expect(greedy.text.startsWith(cancelled.text), "cancelled text is a prefix")

        // stop strings end the text before them
        val stopped = model.generateDetailed(prompt, GenerationConfig(maxNewTokens = 64, ignoreEos = true, stop = listOf("LORD")))
        expect(stopped.finishReason == "stop" && !stopped.text.contains("LORD"), "stop string")

        // invalid options: EdgeloopException with the status and the message of the C API
        try {
            model.generate(prompt, GenerationConfig(temperature = Double.NaN))
            throw AssertionError("NaN temperature accepted")
        } catch (e: EdgeloopException) {
            expect(e.status == EdgeloopException.INVALID_ARGUMENT && e.message!!.contains("temperature"), "NaN: " + e.message)
        }
        // an exception thrown by the callback reaches the caller
        try {
            model.generate(prompt) { throw IllegalStateException("from the callback") }
            throw AssertionError("callback exception lost")
        } catch (e: IllegalStateException) {
            expect(e.message == "from the callback", "callback exception")
        }
    }

    // the library given by path (how an app loads the libmodel.so it linked from model.tar)
    EdgeloopModel(artifact, libraryPath = "$artifact/model.so").use { model ->
        expect(model.generate(prompt, GenerationConfig(maxNewTokens = 8, ignoreEos = true)).isNotEmpty(), "libraryPath")
    }

    EdgeloopModel(artifact, exitPolicy = "depth:2").use { model ->
        emit("depth2", model.generateDetailed(prompt, GenerationConfig(maxNewTokens = 64, ignoreEos = true)))
    }

    try {
        EdgeloopModel("$artifact/does-not-exist")
        throw AssertionError("missing artifact loaded")
    } catch (e: EdgeloopException) {
        expect(e.status == EdgeloopException.IO && e.statusName == "EL_ERR_IO", "missing artifact: " + e.statusName)
    }
    try {
        EdgeloopModel(artifact, exitPolicy = "confidence:7")
        throw AssertionError("bad policy accepted")
    } catch (e: EdgeloopException) {
        expect(e.status == EdgeloopException.INVALID_ARGUMENT, "bad policy")
    }
    val closed = EdgeloopModel(artifact)
    closed.close()
    closed.close()  // idempotent
    try {
        closed.generate(prompt)
        throw AssertionError("closed model used")
    } catch (e: IllegalStateException) {
    }
    println("ok " + EdgeloopModel.version())
}
