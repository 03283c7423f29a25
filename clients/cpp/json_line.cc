#include "json_line.h"

#include <charconv>
#include <cmath>

namespace maas {

std::string JsonString(std::string_view value) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "\"";
  for (char c : value) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += "\\u00";
          out += kHex[(c >> 4) & 0xf];
          out += kHex[c & 0xf];
        } else {
          out += c;  // UTF-8 passes through as is.
        }
    }
  }
  return out + "\"";
}

std::string JsonNumber(double value) {
  if (!std::isfinite(value)) return "null";
  char buffer[32];
  // The shortest text that reads back as the same double.
  auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return error == std::errc() ? std::string(buffer, end) : "null";
}

std::string JsonArray(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

std::string JsonArray(const std::vector<std::string>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + JsonString(values[i]);
  return out + "]";
}

std::string JsonObjectOf(const std::map<std::string, double>& values) {
  std::string out = "{";
  for (const auto& [key, value] : values) {
    if (out.size() > 1) out += ", ";
    out += JsonString(key) + ": " + JsonNumber(value);
  }
  return out + "}";
}

JsonLine& JsonLine::Raw(std::string_view key, std::string_view json) {
  if (body_.size() > 1) body_ += ", ";
  body_ += JsonString(key);
  body_ += ": ";
  body_ += json;
  return *this;
}

JsonLine& JsonLine::Str(std::string_view key, std::string_view value) { return Raw(key, JsonString(value)); }
JsonLine& JsonLine::Int(std::string_view key, int64_t value) { return Raw(key, std::to_string(value)); }
JsonLine& JsonLine::Num(std::string_view key, double value) { return Raw(key, JsonNumber(value)); }

}  // namespace maas
