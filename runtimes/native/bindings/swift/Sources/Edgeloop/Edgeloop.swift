// Swift binding of the edgeloop native runtime over its C API (CEdgeloop = include/edgeloop.h).
//
//     let model = try EdgeloopModel(path: artifactURL.path)
//     for await piece in model.stream("And God said", config: GenerationConfig(maxNewTokens: 64)) {
//         print(piece, terminator: "")
//     }
//
// The model owns one el_model and one el_session; calls are serialized by a lock, so one model
// runs one generation at a time. `cancel()` may be called from any thread; ending the consuming
// task of `stream` cancels the generation too.
import CEdgeloop
import Foundation

/// A failure of the native library: the el_status and el_last_error()'s line.
public struct EdgeloopError: Error, CustomStringConvertible {
    public let status: el_status
    public let message: String

    public var statusName: String { String(cString: el_status_name(status)) }
    public var description: String { "\(statusName): \(message)" }

    static func last(_ status: el_status) -> EdgeloopError {
        EdgeloopError(status: status, message: String(cString: el_last_error()))
    }
}

/// Sampling and stopping options; nil fields take the model's defaults (el_generation_default_params).
public struct GenerationConfig {
    public var maxNewTokens: Int?
    public var temperature: Double?  // 0 = greedy
    public var topK: Int?
    public var topP: Double?
    public var minP: Double?
    public var repetitionPenalty: Double?
    public var seed: UInt64?  // nil: a random seed, reported in GenerationResult.seed
    public var stop: [String]
    public var ignoreEos: Bool
    public var truncate: Bool  // cut a prompt that does not fit instead of failing
    public var reusePrefix: Bool  // keep the KV of the common prefix with the previous call (chat)

    public init(maxNewTokens: Int? = nil, temperature: Double? = nil, topK: Int? = nil, topP: Double? = nil,
                minP: Double? = nil, repetitionPenalty: Double? = nil, seed: UInt64? = nil, stop: [String] = [],
                ignoreEos: Bool = false, truncate: Bool = false, reusePrefix: Bool = false) {
        self.maxNewTokens = maxNewTokens
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.minP = minP
        self.repetitionPenalty = repetitionPenalty
        self.seed = seed
        self.stop = stop
        self.ignoreEos = ignoreEos
        self.truncate = truncate
        self.reusePrefix = reusePrefix
    }
}

/// One generation: its text, tokens, the loop passes each token ran, and statistics.
public struct GenerationResult {
    public let text: String
    public let tokens: [Int32]
    public let depths: [Int32]
    public let finishReason: el_finish_reason
    public let promptTokens: Int
    public let timeToFirstToken: Double  // seconds
    public let decodeTokensPerSecond: Double
    public let meanLoops: Double
    public let seed: UInt64
}

public final class EdgeloopModel: @unchecked Sendable {
    private let model: OpaquePointer
    private let session: OpaquePointer
    private let lock = NSLock()

    /// Loads the artifact directory at `path` (checked: manifest, digest, schema, checksums).
    /// - Parameters:
    ///   - exitPolicy: nil = the artifact's default; "none"; "confidence:0.9", "depth:2", ...
    ///   - maxLoops: 0 = all passes of the loop.
    ///   - libraryPath: the model library linked for this device from a cross-compiled artifact's
    ///     model.tar (an embedded, signed framework binary on iOS); nil = the artifact's model.so.
    public init(path: String, threads: Int = 0, exitPolicy: String? = nil, maxLoops: Int = 0,
                libraryPath: String? = nil) throws {
        var mp = el_model_default_params()
        mp.n_threads = Int32(threads)
        var m: OpaquePointer?
        let status: el_status
        if let library = libraryPath {
            status = library.withCString { cLibrary -> el_status in
                mp.library_path = cLibrary
                return el_model_load(path, mp, &m)
            }
        } else {
            status = el_model_load(path, mp, &m)
        }
        guard status == EL_OK, let loaded = m else { throw EdgeloopError.last(status) }
        var sp = el_session_default_params()
        sp.max_loops = Int32(maxLoops)
        var s: OpaquePointer?
        let created: el_status
        if let policy = exitPolicy {
            created = policy.withCString { cPolicy -> el_status in
                sp.exit_policy = cPolicy
                return el_session_create(loaded, sp, &s)
            }
        } else {
            created = el_session_create(loaded, sp, &s)
        }
        guard created == EL_OK, let session = s else {
            let error = EdgeloopError.last(created)
            el_model_free(loaded)
            throw error
        }
        model = loaded
        self.session = session
    }

    deinit {
        el_session_free(session)
        el_model_free(model)
    }

    public var vocabSize: Int { Int(el_model_n_vocab(model)) }
    public var contextSize: Int { Int(el_model_n_ctx(model)) }
    public var loops: Int { Int(el_model_n_loops(model)) }

    /// Stops the running generation before its next token (any thread).
    public func cancel() { el_session_cancel(session) }

    public func tokenize(_ text: String, addSpecial: Bool = true) throws -> [Int32] {
        let length = text.utf8.count
        let n = text.withCString { el_tokenize(model, $0, length, addSpecial, nil, 0) }
        guard n >= 0 else { throw EdgeloopError.last(el_status(rawValue: UInt32(-n))) }
        var ids = [el_token](repeating: 0, count: Int(n))
        _ = text.withCString { el_tokenize(model, $0, length, addSpecial, &ids, n) }
        return ids
    }

    /// Generates after `prompt`, calling `onPiece` with the text as it is completed (return false to
    /// cancel). Throws EdgeloopError; a cancelled generation returns normally (finishReason
    /// EL_FINISH_CANCELLED) with the text so far.
    @discardableResult
    public func generate(_ prompt: String, config: GenerationConfig = GenerationConfig(),
                         onPiece: @escaping (String) -> Bool = { _ in true }) throws -> GenerationResult {
        lock.lock()
        defer { lock.unlock() }
        var p = el_generation_default_params(model)
        if let v = config.maxNewTokens { p.max_new_tokens = Int32(clamping: v) }
        if let v = config.temperature { p.temperature = v }
        if let v = config.topK { p.top_k = Int32(clamping: v) }
        if let v = config.topP { p.top_p = v }
        if let v = config.minP { p.min_p = v }
        if let v = config.repetitionPenalty { p.repetition_penalty = v }
        if let v = config.seed {
            p.seed = v
            p.has_seed = true
        }
        p.ignore_eos = config.ignoreEos
        p.truncate = config.truncate
        p.reuse_prefix = config.reusePrefix

        let sink = Unmanaged.passRetained(PieceSink(onPiece))
        defer { sink.release() }
        let cStops = config.stop.map { strdup($0) }
        defer { cStops.forEach { free($0) } }
        let stopPointers: [UnsafePointer<CChar>?] = cStops.map { $0.map { UnsafePointer($0) } }
        var result = el_generation_result()
        let status = stopPointers.withUnsafeBufferPointer { stops -> el_status in
            p.stop = stops.baseAddress
            p.n_stop = stops.count
            return el_generate(session, prompt, &p, { _, piece, length, user in
                let sink = Unmanaged<PieceSink>.fromOpaque(user!).takeUnretainedValue()
                guard let piece = piece, length > 0 else { return 0 }
                let text = String(decoding: UnsafeRawBufferPointer(start: piece, count: length), as: UTF8.self)
                return sink.onPiece(text) ? 0 : 1
            }, sink.toOpaque(), &result)
        }
        guard status == EL_OK || status == EL_ERR_CANCELLED else { throw EdgeloopError.last(status) }
        return lastResult(result)
    }

    /// The pieces of one generation as an AsyncStream (errors end the stream; `generate` throws them).
    /// Cancelling the consuming task cancels the generation.
    public func stream(_ prompt: String, config: GenerationConfig = GenerationConfig()) -> AsyncStream<String> {
        AsyncStream { continuation in
            let worker = Thread { [self] in
                _ = try? self.generate(prompt, config: config) { piece in
                    continuation.yield(piece)
                    return true
                }
                continuation.finish()
            }
            continuation.onTermination = { [weak self] termination in
                if case .cancelled = termination { self?.cancel() }
            }
            worker.start()
        }
    }

    private func lastResult(_ r: el_generation_result) -> GenerationResult {
        let n = Int(el_session_tokens(session, nil, nil, 0))
        var tokens = [el_token](repeating: 0, count: n)
        var depths = [Int32](repeating: 0, count: n)
        _ = el_session_tokens(session, &tokens, &depths, Int32(n))
        let length = Int(el_session_text(session, nil, 0))
        var bytes = [CChar](repeating: 0, count: length + 1)
        _ = el_session_text(session, &bytes, bytes.count)
        let text = String(decoding: bytes.prefix(length).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return GenerationResult(text: text, tokens: tokens, depths: depths, finishReason: r.finish_reason,
                                promptTokens: Int(r.n_prompt_tokens), timeToFirstToken: r.prefill_seconds,
                                decodeTokensPerSecond: r.decode_tokens_per_second, meanLoops: r.mean_loops,
                                seed: r.seed)
    }

    private final class PieceSink {
        let onPiece: (String) -> Bool
        init(_ onPiece: @escaping (String) -> Bool) { self.onPiece = onPiece }
    }
}
