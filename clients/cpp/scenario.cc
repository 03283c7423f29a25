// `maas_scenario <gateway host:port> <run id>`: the client scenario of tests/clients/scenario.py.
//
// Prints one JSON object per line for each step and exits 0 only when every step worked; a step
// that fails says why on stderr and the others still run. MAAS_API_KEY, when set, is sent as
// `authorization: Bearer <key>`.
#include <cmath>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "json_line.h"
#include "maas_client.h"

namespace {

using maas::Check;
using maas::Client;
using maas::JsonArray;
using maas::JsonLine;
using maas::Output;
namespace dense = maas::dense::v1;
namespace gnn = maas::gnn::v1;
namespace nlp = maas::nlp::v1;
namespace training = maas::training::v1;

constexpr int64_t kPixels = 64;  // 8x8 digit images, raw values 0..16

// The first three scikit-learn digits: a 0, a 1 and a 2.
const std::vector<std::vector<float>> kDigits = {
    {0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
     0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0},
    {0, 0, 0, 12, 13, 5, 0, 0, 0, 0, 0, 11, 16, 9, 0, 0, 0, 0, 3, 15, 16, 6, 0, 0, 0, 7, 15, 16, 16, 2, 0, 0,
     0, 0, 1, 16, 16, 3, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 0, 11, 16, 10, 0, 0},
    {0, 0, 0, 4, 15, 12, 0, 0, 0, 0, 3, 16, 15, 14, 0, 0, 0, 0, 8, 13, 8, 16, 0, 0, 0, 0, 1, 6, 15, 11, 0, 0,
     0, 1, 8, 13, 15, 1, 0, 0, 0, 9, 16, 16, 5, 0, 0, 0, 0, 3, 13, 16, 16, 11, 5, 0, 0, 0, 0, 3, 11, 16, 9, 0},
};
const std::vector<int64_t> kKarateNodes = {0, 16, 33};
const std::vector<std::string> kEmbedTexts = {"A man is playing a guitar.", "Someone plays the guitar."};
const std::vector<std::string> kSentimentTexts = {"I love this, it is wonderful!", "This is awful, I hate it."};

void Emit(const JsonLine& line) { std::cout << line.str() << std::endl; }  // flushed: a later crash keeps it

dense::PredictRequest DigitsRequest(std::vector<float> pixels, int64_t columns) {
  const auto rows = static_cast<int64_t>(pixels.size()) / columns;
  dense::PredictRequest request;
  request.set_model_name("digits-mlp");
  (*request.mutable_inputs())["pixels"] = maas::EncodeFp32(pixels, {rows, columns});
  return request;
}

void Dense(Client& client) {
  std::vector<float> pixels;
  for (const auto& digit : kDigits) pixels.insert(pixels.end(), digit.begin(), digit.end());
  dense::PredictResponse reply;
  Check(client.dense().Predict(client.Context().get(), DigitsRequest(pixels, kPixels), &reply),
        "DenseService.Predict");
  Emit(JsonLine()
           .Str("step", "dense")
           .Str("model", reply.model_name())
           .Int("version", reply.model_version())
           .Raw("labels", JsonArray(maas::DecodeInt64(Output(reply.outputs(), "label"), "label"))));
}

void Gnn(Client& client) {
  gnn::PredictRequest request;
  request.set_model_name("karate-gcn");
  request.set_stored_graph("karate");
  request.mutable_node_ids()->Add(kKarateNodes.begin(), kKarateNodes.end());
  gnn::PredictResponse reply;
  Check(client.gnn().Predict(client.Context().get(), request, &reply), "GnnService.Predict");
  Emit(JsonLine()
           .Str("step", "gnn")
           .Str("model", reply.model_name())
           .Int("version", reply.model_version())
           .Raw("node_ids", JsonArray(std::vector<int64_t>(reply.node_ids().begin(), reply.node_ids().end())))
           .Raw("labels", JsonArray(maas::DecodeInt64(Output(reply.outputs(), "label"), "label"))));
}

nlp::PredictResponse NlpPredict(Client& client, const std::string& model, const std::vector<std::string>& texts) {
  nlp::PredictRequest request;
  request.set_model_name(model);
  request.mutable_texts()->Add(texts.begin(), texts.end());
  nlp::PredictResponse reply;
  Check(client.nlp().Predict(client.Context().get(), request, &reply), "NlpService.Predict(" + model + ")");
  return reply;
}

void Embed(Client& client) {
  const auto reply = NlpPredict(client, "minilm-l6-v2", kEmbedTexts);
  const auto& tensor = Output(reply.outputs(), "embedding");
  const auto values = maas::DecodeFp32(tensor, "embedding");
  if (tensor.shape_size() != 2 || tensor.shape(0) < 2) {
    throw std::runtime_error("expected an embedding per text, got shape " +
                             JsonArray(std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end())));
  }
  const auto dim = static_cast<size_t>(tensor.shape(1));
  double dot = 0, norm_a = 0, norm_b = 0;
  for (size_t i = 0; i < dim; ++i) {
    const double a = values[i], b = values[dim + i];
    dot += a * b;
    norm_a += a * a;
    norm_b += b * b;
  }
  Emit(JsonLine()
           .Str("step", "embed")
           .Str("model", reply.model_name())
           .Int("version", reply.model_version())
           .Raw("shape", JsonArray(std::vector<int64_t>(tensor.shape().begin(), tensor.shape().end())))
           .Num("cosine", dot / std::sqrt(norm_a * norm_b)));
}

void Classify(Client& client) {
  const auto reply = NlpPredict(client, "sentiment", kSentimentTexts);
  Emit(JsonLine()
           .Str("step", "classify")
           .Str("model", reply.model_name())
           .Int("version", reply.model_version())
           .Raw("labels", JsonArray(std::vector<std::string>(reply.labels().begin(), reply.labels().end()))));
}

bool IsTerminal(training::JobState state) {
  return state == training::JOB_STATE_SUCCEEDED || state == training::JOB_STATE_FAILED ||
         state == training::JOB_STATE_CANCELLED;
}

void Train(Client& client, const std::string& run_id) {
  training::SubmitJobRequest submit;
  submit.set_family(training::FAMILY_DENSE);
  submit.set_architecture("mlp");
  submit.set_optimizer(training::OPTIMIZER_ADAM);
  submit.set_epochs(3);
  submit.set_builtin_dataset("iris");
  submit.set_output_model("cpp-client-iris");
  submit.set_idempotency_key(run_id);
  training::SubmitJobResponse submitted;
  Check(client.training().SubmitJob(client.Context().get(), submit, &submitted), "TrainingService.SubmitJob");
  const std::string job_id = submitted.job().job_id();
  Emit(JsonLine()
           .Str("step", "submitted")
           .Str("job_id", job_id)
           .Str("state", training::JobState_Name(submitted.job().state())));

  // The stream replays the job's history, then follows it until a terminal state.
  training::WatchJobRequest watch;
  watch.set_job_id(job_id);
  auto context = client.Context(Client::kStreamDeadline);
  auto stream = client.training().WatchJob(context.get(), watch);
  training::WatchJobResponse response;
  auto last = training::JOB_STATE_UNSPECIFIED;
  while (stream->Read(&response)) {
    const auto& event = response.event();
    last = event.state();
    Emit(JsonLine()
             .Str("step", "event")
             .Str("state", training::JobState_Name(event.state()))
             .Int("epoch", event.epoch())
             .Int("epochs", event.epochs())
             .Num("train_loss", event.train_loss()));
  }
  Check(stream->Finish(), "TrainingService.WatchJob");
  if (!IsTerminal(last)) {
    throw std::runtime_error("WatchJob ended before a terminal state (last " + training::JobState_Name(last) + ")");
  }

  training::GetJobRequest get;
  get.set_job_id(job_id);
  training::GetJobResponse got;
  Check(client.training().GetJob(client.Context().get(), get, &got), "TrainingService.GetJob");
  const auto& job = got.job();
  Emit(JsonLine()
           .Str("step", "job")
           .Str("state", training::JobState_Name(job.state()))
           .Int("model_version", job.model_version())
           .Raw("metrics", maas::JsonObjectOf(std::map<std::string, double>(job.metrics().begin(), job.metrics().end()))));
  if (job.state() != training::JOB_STATE_SUCCEEDED) {
    throw std::runtime_error("job " + job_id + " ended " + training::JobState_Name(job.state()) + ": " + job.error());
  }
}

void BadInput(Client& client) {
  // 63 columns where digits-mlp takes 64.
  std::vector<float> pixels(kDigits[0].begin(), kDigits[0].begin() + (kPixels - 1));
  dense::PredictResponse reply;
  const grpc::Status status =
      client.dense().Predict(client.Context().get(), DigitsRequest(std::move(pixels), kPixels - 1), &reply);
  Emit(JsonLine()
           .Str("step", "bad_input")
           .Int("code", static_cast<int64_t>(status.error_code()))
           .Str("code_name", maas::StatusCodeName(status.error_code()))
           .Str("details", status.error_message()));
  if (status.error_code() != grpc::StatusCode::INVALID_ARGUMENT) {
    throw std::runtime_error("expected INVALID_ARGUMENT for 63 pixels, got " +
                             std::string(maas::StatusCodeName(status.error_code())));
  }
}

}  // namespace

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  if (argc != 3 || *argv[1] == '\0' || *argv[2] == '\0') {
    std::cerr << "usage: " << argv[0] << " <gateway host:port> <run id>\n";
    return 2;
  }
  const std::string run_id = argv[2];
  const char* api_key = std::getenv("MAAS_API_KEY");
  Client client(argv[1], api_key ? api_key : "");

  const std::vector<std::pair<const char*, std::function<void()>>> steps = {
      {"dense", [&] { Dense(client); }},
      {"gnn", [&] { Gnn(client); }},
      {"embed", [&] { Embed(client); }},
      {"classify", [&] { Classify(client); }},
      {"training", [&] { Train(client, run_id); }},
      {"bad_input", [&] { BadInput(client); }},
  };
  int failed = 0;
  for (const auto& [name, run] : steps) {
    try {
      run();
    } catch (const std::exception& error) {
      std::cerr << "maas_scenario: step " << name << " failed: " << error.what() << std::endl;
      ++failed;
    }
  }
  if (failed > 0) std::cerr << "maas_scenario: " << failed << " of " << steps.size() << " steps failed\n";
  return failed == 0 ? 0 : 1;
}
