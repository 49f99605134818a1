# cmake -DINPUT=file -DOUTPUT=file.cpp -DSYMBOL=name -P embed_file.cmake
# Writes a C++ source defining `extern const unsigned char SYMBOL Bytes[]` and `SYMBOL Size`
# (namespace edgeloop) with the bytes of INPUT, followed by a NUL that is not counted.
file(READ "${INPUT}" hex HEX)
string(LENGTH "${hex}" digits)
math(EXPR size "${digits} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "((0x..,){24})" "\\1\n" bytes "${bytes}")
file(WRITE "${OUTPUT}.tmp"
  "// Generated from ${INPUT} by cmake/embed_file.cmake; do not edit.\n"
  "#include <cstddef>\n"
  "namespace edgeloop {\n"
  "extern const unsigned char ${SYMBOL}Bytes[] = {\n${bytes}0x00};\n"
  "extern const size_t ${SYMBOL}Size = ${size};\n"
  "}  // namespace edgeloop\n")
configure_file("${OUTPUT}.tmp" "${OUTPUT}" COPYONLY)
file(REMOVE "${OUTPUT}.tmp")
