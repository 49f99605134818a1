// Run with an artifact compiled for this machine:
//   EDGELOOP_TEST_ARTIFACT=/path/to/kjv-tvm swift test -Xlinker -L/path/to/build
import Edgeloop
import XCTest

final class EdgeloopTests: XCTestCase {
    private func artifact() throws -> String {
        guard let path = ProcessInfo.processInfo.environment["EDGELOOP_TEST_ARTIFACT"] else {
            throw XCTSkip("set EDGELOOP_TEST_ARTIFACT to a compiled TVM CPU artifact")
        }
        return path
    }

    func testStreamedPiecesMakeTheText() async throws {
        let model = try EdgeloopModel(path: try artifact())
        let config = GenerationConfig(maxNewTokens: 32, ignoreEos: true)
        var streamed = ""
        for await piece in model.stream("And God said unto Moses", config: config) {
            streamed += piece
        }
        let result = try model.generate("And God said unto Moses", config: config)
        XCTAssertEqual(streamed, result.text)
        XCTAssertEqual(result.tokens.count, 32)
    }

    func testCancelAndErrors() throws {
        let model = try EdgeloopModel(path: try artifact())
        var count = 0
        let result = try model.generate("And God said", config: GenerationConfig(maxNewTokens: 64, ignoreEos: true)) { _ in
            count += 1
            return count < 3
        }
        XCTAssertEqual(result.finishReason, EL_FINISH_CANCELLED)
        XCTAssertThrowsError(try model.generate("x", config: GenerationConfig(temperature: .nan))) { error in
            XCTAssertEqual((error as? EdgeloopError)?.status, EL_ERR_INVALID_ARGUMENT)
        }
        XCTAssertThrowsError(try EdgeloopModel(path: "/nonexistent")) { error in
            XCTAssertEqual((error as? EdgeloopError)?.status, EL_ERR_IO)
        }
    }
}
