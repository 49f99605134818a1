// Internal errors: every failure inside the library is an edgeloop::Error carrying the el_status
// the C API returns; the C boundary (edgeloop.cpp) turns it into a status and el_last_error().
#pragma once

#include <stdexcept>
#include <string>

#include "edgeloop.h"

namespace edgeloop {

struct Error : std::runtime_error {
  Error(el_status status, const std::string& message) : std::runtime_error(message), status(status) {}
  el_status status;
};

[[noreturn]] inline void raise(el_status status, const std::string& message) { throw Error(status, message); }

}  // namespace edgeloop
