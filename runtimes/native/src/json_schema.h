// A validator for the JSON-Schema subset pydantic emits (enough for runtimes/schema/artifact.schema.json):
// $defs + $ref ("#/..." pointers), type (one or a list), properties, required, additionalProperties
// (false, true or a schema), items, prefixItems, minItems / maxItems, enum, const, anyOf / allOf /
// oneOf, minimum / maximum / exclusiveMinimum / exclusiveMaximum, minLength / maxLength.
// Annotations (title, description, default, examples, $schema, $id) are ignored.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace edgeloop {

class SchemaValidator {
 public:
  explicit SchemaValidator(nlohmann::json root) : root_(std::move(root)) {}

  // "" when `value` matches the schema, else one line naming the first bad field:
  // "field loop.host_loop: input should be a valid boolean (got \"yes\")".
  std::string validate(const nlohmann::json& value) const;

 private:
  bool check(const nlohmann::json& schema, const nlohmann::json& value, const std::string& path, std::string& error,
             int depth) const;
  const nlohmann::json& resolve(const std::string& ref) const;
  nlohmann::json root_;
};

}  // namespace edgeloop
