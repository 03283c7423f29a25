#include "maas_client.h"

#include <cmath>
#include <cstring>
#include <utility>

#include "json_line.h"

namespace maas {
namespace {

using common::v1::DataType;
using common::v1::DataType_Name;

// Byte-wise, so that the wire format is little-endian whatever the host's order.
template <typename Bits>
void AppendLittleEndian(std::string& out, Bits bits) {
  for (size_t i = 0; i < sizeof(Bits); ++i) {
    out.push_back(static_cast<char>((bits >> (8 * i)) & 0xff));
  }
}

template <typename Bits>
Bits ReadLittleEndian(const char* bytes) {
  Bits bits = 0;
  for (size_t i = 0; i < sizeof(Bits); ++i) {
    bits |= static_cast<Bits>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  }
  return bits;
}

int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (int64_t dim : shape) {
    if (dim < 0) throw std::invalid_argument("a tensor shape cannot have a negative dimension");
    count *= dim;
  }
  return count;
}

std::string ShapeText(const google::protobuf::RepeatedField<int64_t>& shape) {
  return JsonArray(std::vector<int64_t>(shape.begin(), shape.end()));
}

// Decodes a tensor of `Value`s, stored as `Bits` (same size) on the wire.
template <typename Value, typename Bits>
std::vector<Value> Decode(const Tensor& tensor, DataType dtype, std::string_view name) {
  static_assert(sizeof(Value) == sizeof(Bits));
  const std::string where = "output '" + std::string(name) + "'";
  if (tensor.dtype() != dtype) {
    throw std::runtime_error(where + ": expected " + DataType_Name(dtype) + ", got " +
                             DataType_Name(tensor.dtype()));
  }
  int64_t count = 1;
  for (int64_t dim : tensor.shape()) {
    if (dim < 0) throw std::runtime_error(where + ": negative dimension in shape " + ShapeText(tensor.shape()));
    count *= dim;
  }
  const std::string& data = tensor.data();
  if (data.size() != static_cast<size_t>(count) * sizeof(Value)) {
    throw std::runtime_error(where + ": shape " + ShapeText(tensor.shape()) + " needs " +
                             std::to_string(count * sizeof(Value)) + " bytes, got " + std::to_string(data.size()));
  }
  std::vector<Value> values(static_cast<size_t>(count));
  for (size_t i = 0; i < values.size(); ++i) {
    const Bits bits = ReadLittleEndian<Bits>(data.data() + i * sizeof(Bits));
    std::memcpy(&values[i], &bits, sizeof(Value));
  }
  return values;
}

}  // namespace

Tensor EncodeFp32(const std::vector<float>& values, const std::vector<int64_t>& shape) {
  if (ElementCount(shape) != static_cast<int64_t>(values.size())) {
    throw std::invalid_argument("shape " + JsonArray(shape) + " does not hold " + std::to_string(values.size()) +
                                " values");
  }
  Tensor tensor;
  tensor.set_dtype(common::v1::DATA_TYPE_FP32);
  tensor.mutable_shape()->Add(shape.begin(), shape.end());
  std::string data;
  data.reserve(values.size() * sizeof(float));
  for (float value : values) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    AppendLittleEndian(data, bits);
  }
  tensor.set_data(std::move(data));
  return tensor;
}

std::vector<float> DecodeFp32(const Tensor& tensor, std::string_view name) {
  return Decode<float, uint32_t>(tensor, common::v1::DATA_TYPE_FP32, name);
}

std::vector<int64_t> DecodeInt64(const Tensor& tensor, std::string_view name) {
  return Decode<int64_t, uint64_t>(tensor, common::v1::DATA_TYPE_INT64, name);
}

const Tensor& Output(const google::protobuf::Map<std::string, Tensor>& outputs, const std::string& name) {
  auto found = outputs.find(name);
  if (found == outputs.end()) throw std::runtime_error("the reply has no output '" + name + "'");
  return found->second;
}

RpcError::RpcError(std::string_view call, const grpc::Status& status)
    : std::runtime_error(std::string(call) + " failed: " + std::string(StatusCodeName(status.error_code())) + ": " +
                         status.error_message()),
      code_(status.error_code()) {}

void Check(const grpc::Status& status, std::string_view call) {
  if (!status.ok()) throw RpcError(call, status);
}

std::string_view StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN_CODE";
  }
}

Client::Client(const std::string& target, std::string api_key)
    : api_key_(std::move(api_key)),
      channel_(grpc::CreateChannel(target, grpc::InsecureChannelCredentials())),
      dense_(dense::v1::DenseService::NewStub(channel_)),
      gnn_(gnn::v1::GnnService::NewStub(channel_)),
      nlp_(nlp::v1::NlpService::NewStub(channel_)),
      training_(training::v1::TrainingService::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> Client::Context(std::chrono::seconds timeout) const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(std::chrono::system_clock::now() + timeout);
  if (!api_key_.empty()) context->AddMetadata("authorization", "Bearer " + api_key_);
  return context;
}


}  // namespace maas
