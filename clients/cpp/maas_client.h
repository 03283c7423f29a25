// A small C++ client for the maas gateway: tensor helpers, the stubs behind one channel, and
// the JSON writing the scenario program needs.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "maas/common/v1/tensor.pb.h"
#include "maas/dense/v1/dense.grpc.pb.h"
#include "maas/gnn/v1/gnn.grpc.pb.h"
#include "maas/nlp/v1/nlp.grpc.pb.h"
#include "maas/training/v1/training.grpc.pb.h"

namespace maas {

using common::v1::Tensor;

// ---- Tensors: dtype + shape + row-major little-endian bytes. ----

// Encodes FP32 values; throws std::invalid_argument when the shape does not hold them.
Tensor EncodeFp32(const std::vector<float>& values, const std::vector<int64_t>& shape);

// Decode a tensor, checking its dtype and that its bytes match its shape; `name` is for messages.
// Throw std::runtime_error on a mismatch.
std::vector<float> DecodeFp32(const Tensor& tensor, std::string_view name);
std::vector<int64_t> DecodeInt64(const Tensor& tensor, std::string_view name);

// The named output of a reply; throws std::runtime_error when it is absent.
const Tensor& Output(const google::protobuf::Map<std::string, Tensor>& outputs, const std::string& name);

// ---- RPCs. ----

// A failed call: its status code and message.
class RpcError : public std::runtime_error {
 public:
  RpcError(std::string_view call, const grpc::Status& status);
  grpc::StatusCode code() const { return code_; }

 private:
  grpc::StatusCode code_;
};

// Throws RpcError unless the status is OK.
void Check(const grpc::Status& status, std::string_view call);

// "INVALID_ARGUMENT" for grpc::StatusCode::INVALID_ARGUMENT, and so on.
std::string_view StatusCodeName(grpc::StatusCode code);

// The stubs of the four services the gateway serves, on one channel.
class Client {
 public:
  static constexpr std::chrono::seconds kUnaryDeadline{30};
  static constexpr std::chrono::seconds kStreamDeadline{300};

  // An empty `api_key` sends no authorization metadata.
  Client(const std::string& target, std::string api_key);

  // A context for one call: its deadline, and `authorization: Bearer <key>` when a key is set.
  std::unique_ptr<grpc::ClientContext> Context(std::chrono::seconds timeout = kUnaryDeadline) const;

  dense::v1::DenseService::Stub& dense() { return *dense_; }
  gnn::v1::GnnService::Stub& gnn() { return *gnn_; }
  nlp::v1::NlpService::Stub& nlp() { return *nlp_; }
  training::v1::TrainingService::Stub& training() { return *training_; }

 private:
  std::string api_key_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<dense::v1::DenseService::Stub> dense_;
  std::unique_ptr<gnn::v1::GnnService::Stub> gnn_;
  std::unique_ptr<nlp::v1::NlpService::Stub> nlp_;
  std::unique_ptr<training::v1::TrainingService::Stub> training_;
};

}  // namespace maas
