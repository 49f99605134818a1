// JSON-Schema subset validator (see json_schema.h). Errors name the field as pydantic does
// (dot-separated keys and array indices) and stop at the first mismatch.
#include "json_schema.h"

#include <stdexcept>

namespace edgeloop {

using nlohmann::json;

namespace {

std::string field(const std::string& path) { return path.empty() ? "(top level)" : path; }

std::string join(const std::string& path, const std::string& key) { return path.empty() ? key : path + "." + key; }

std::string got(const json& value) {
  if (value.is_object() || value.is_array()) return "";
  std::string s = value.dump(-1, ' ', true, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 60);
  return " (got " + s + ")";
}

bool has_type(const json& value, const std::string& type) {
  if (type == "object") return value.is_object();
  if (type == "array") return value.is_array();
  if (type == "string") return value.is_string();
  if (type == "integer") return value.is_number_integer();
  if (type == "number") return value.is_number();
  if (type == "boolean") return value.is_boolean();
  if (type == "null") return value.is_null();
  throw std::runtime_error("the embedded schema uses an unknown type " + type);
}

std::string type_words(const std::string& type) {
  if (type == "object") return "a valid dictionary";
  if (type == "array") return "a valid list";
  if (type == "string") return "a valid string";
  if (type == "integer") return "a valid integer";
  if (type == "number") return "a valid number";
  if (type == "boolean") return "a valid boolean";
  return "null";
}

bool fail(std::string& error, const std::string& path, const std::string& message, const json& value) {
  error = "field " + field(path) + ": " + message + got(value);
  return false;
}

}  // namespace

std::string SchemaValidator::validate(const json& value) const {
  std::string error;
  check(root_, value, "", error, 0);
  return error;
}

const json& SchemaValidator::resolve(const std::string& ref) const {
  if (ref.empty() || ref[0] != '#') throw std::runtime_error("the embedded schema has a non-local $ref " + ref);
  return root_.at(json::json_pointer(ref.substr(1)));
}

bool SchemaValidator::check(const json& schema, const json& value, const std::string& path, std::string& error,
                            int depth) const {
  if (depth > 64) return fail(error, path, "the manifest nests too deeply", value);
  if (schema.is_boolean()) return schema.get<bool>() || fail(error, path, "no value is allowed here", value);
  if (!schema.is_object()) throw std::runtime_error("the embedded schema is malformed at " + field(path));

  if (auto it = schema.find("$ref"); it != schema.end())
    if (!check(resolve(it->get<std::string>()), value, path, error, depth + 1)) return false;

  if (auto it = schema.find("anyOf"); it != schema.end()) {
    std::string first, non_null;
    bool ok = false;
    for (const json& option : *it) {
      std::string e;
      if (check(option, value, path, e, depth + 1)) {
        ok = true;
        break;
      }
      if (first.empty()) first = e;
      const bool null_option = option.is_object() && option.value("type", json()) == "null";
      if (!null_option && non_null.empty()) non_null = e;
    }
    if (!ok) {
      // "X | None": report why the value is not an X (the useful half of the message)
      error = it->size() == 2 && !non_null.empty() ? non_null : first;
      if (it->size() > 2) error = "field " + field(path) + ": input matches none of the allowed forms" + got(value);
      return false;
    }
  }
  if (auto it = schema.find("allOf"); it != schema.end())
    for (const json& option : *it)
      if (!check(option, value, path, error, depth + 1)) return false;
  if (auto it = schema.find("oneOf"); it != schema.end()) {
    int matches = 0;
    for (const json& option : *it) {
      std::string e;
      matches += check(option, value, path, e, depth + 1) ? 1 : 0;
    }
    if (matches != 1) return fail(error, path, "input should match exactly one allowed form", value);
  }

  if (auto it = schema.find("type"); it != schema.end()) {
    bool ok = false;
    std::string wanted;
    if (it->is_string()) {
      ok = has_type(value, it->get<std::string>());
      wanted = type_words(it->get<std::string>());
    } else {
      for (const json& t : *it) {
        ok = ok || has_type(value, t.get<std::string>());
        wanted += (wanted.empty() ? "" : " or ") + type_words(t.get<std::string>());
      }
    }
    if (!ok) return fail(error, path, "input should be " + wanted, value);
  }
  if (auto it = schema.find("const"); it != schema.end())
    if (value != *it) return fail(error, path, "input should be " + it->dump(), value);
  if (auto it = schema.find("enum"); it != schema.end()) {
    bool ok = false;
    std::string options;
    for (const json& e : *it) {
      ok = ok || value == e;
      options += (options.empty() ? "" : " or ") + e.dump();
    }
    if (!ok) return fail(error, path, "input should be " + options, value);
  }

  if (value.is_number()) {
    const double x = value.get<double>();
    if (auto it = schema.find("minimum"); it != schema.end() && x < it->get<double>())
      return fail(error, path, "input should be at least " + it->dump(), value);
    if (auto it = schema.find("maximum"); it != schema.end() && x > it->get<double>())
      return fail(error, path, "input should be at most " + it->dump(), value);
    if (auto it = schema.find("exclusiveMinimum"); it != schema.end() && x <= it->get<double>())
      return fail(error, path, "input should be greater than " + it->dump(), value);
    if (auto it = schema.find("exclusiveMaximum"); it != schema.end() && x >= it->get<double>())
      return fail(error, path, "input should be less than " + it->dump(), value);
  }
  if (value.is_string()) {
    const size_t n = value.get_ref<const std::string&>().size();  // bytes; the manifest's strings are ASCII
    if (auto it = schema.find("minLength"); it != schema.end() && n < it->get<size_t>())
      return fail(error, path, "string should have at least " + it->dump() + " characters", value);
    if (auto it = schema.find("maxLength"); it != schema.end() && n > it->get<size_t>())
      return fail(error, path, "string should have at most " + it->dump() + " characters", value);
  }

  if (value.is_object()) {
    const auto props = schema.find("properties");
    if (auto it = schema.find("required"); it != schema.end())
      for (const json& name : *it)
        if (!value.contains(name.get<std::string>()))
          return fail(error, join(path, name.get<std::string>()), "field required", json::object());
    const auto extra = schema.find("additionalProperties");
    for (const auto& [key, item] : value.items()) {
      const std::string where = join(path, key);
      if (props != schema.end() && props->contains(key)) {
        if (!check((*props)[key], item, where, error, depth + 1)) return false;
      } else if (extra != schema.end()) {
        if (extra->is_boolean() && !extra->get<bool>())
          return fail(error, where, "extra inputs are not permitted", item);
        if (!check(*extra, item, where, error, depth + 1)) return false;
      }
    }
  }

  if (value.is_array()) {
    const size_t n = value.size();
    if (auto it = schema.find("minItems"); it != schema.end() && n < it->get<size_t>())
      return fail(error, path, "list should have at least " + it->dump() + " items", value);
    if (auto it = schema.find("maxItems"); it != schema.end() && n > it->get<size_t>())
      return fail(error, path, "list should have at most " + it->dump() + " items", value);
    size_t i = 0;
    if (auto it = schema.find("prefixItems"); it != schema.end())
      for (; i < n && i < it->size(); ++i)
        if (!check((*it)[i], value[i], join(path, std::to_string(i)), error, depth + 1)) return false;
    if (auto it = schema.find("items"); it != schema.end())
      for (; i < n; ++i)
        if (!check(*it, value[i], join(path, std::to_string(i)), error, depth + 1)) return false;
  }
  return true;
}

}  // namespace edgeloop
