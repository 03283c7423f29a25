// JSON written by hand, one object per line, so the client needs no JSON library.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace maas {

// A quoted, escaped JSON string.
std::string JsonString(std::string_view value);
// A number; non-finite values (which JSON cannot hold) become null.
std::string JsonNumber(double value);
std::string JsonArray(const std::vector<int64_t>& values);
std::string JsonArray(const std::vector<std::string>& values);
// An object of numbers, keys in sorted order.
std::string JsonObjectOf(const std::map<std::string, double>& values);

// Builds one JSON object; values given to Raw must already be JSON.
class JsonLine {
 public:
  JsonLine& Str(std::string_view key, std::string_view value);
  JsonLine& Int(std::string_view key, int64_t value);
  JsonLine& Num(std::string_view key, double value);
  JsonLine& Raw(std::string_view key, std::string_view json);
  std::string str() const { return body_ + "}"; }

 private:
  std::string body_ = "{";
};

}  // namespace maas
