// swift-tools-version:5.7
// Swift binding of the edgeloop native runtime (runtimes/native/include/edgeloop.h).
//
// As is, CEdgeloop is a system library: the C header from this repository, linked against a
// libedgeloop built by CMake (pass -Xlinker -L<build dir>, or set LIBRARY_SEARCH_PATHS in Xcode).
// For an iOS app, swap it for the XCFramework built as in docs/native.md ("iOS: SwiftPM"):
//     .binaryTarget(name: "CEdgeloop", path: "Edgeloop.xcframework")
// NOT YET COMPILED: no Swift toolchain could be installed where this was written (Debian bookworm
// has no swiftlang package); see docs/native.md.
import PackageDescription

let package = Package(
    name: "Edgeloop",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Edgeloop", targets: ["Edgeloop"]),
    ],
    targets: [
        .systemLibrary(name: "CEdgeloop", path: "Sources/CEdgeloop"),
        .target(name: "Edgeloop", dependencies: ["CEdgeloop"]),
        .testTarget(name: "EdgeloopTests", dependencies: ["Edgeloop"]),
    ]
)
