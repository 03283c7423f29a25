// `node scenario.js <gateway host:port> <run id>`: the client scenario of tests/clients/scenario.py.
// Prints one JSON line per step and exits 0 only when every step worked.

import { status } from "@grpc/grpc-js";
import {
  dense,
  float32s,
  fp32Tensor,
  fp32TensorOfShape,
  gnn,
  insecure,
  int64s,
  isServiceError,
  nlp,
  serverStream,
  training,
  unary,
} from "./maas";

// The first three scikit-learn digits (labels 0, 1, 2), 8x8 pixels valued 0..16.
const DIGITS = [
  [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
   0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0],
  [0, 0, 0, 12, 13, 5, 0, 0, 0, 0, 0, 11, 16, 9, 0, 0, 0, 0, 3, 15, 16, 6, 0, 0, 0, 7, 15, 16, 16, 2, 0, 0,
   0, 0, 1, 16, 16, 3, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 0, 11, 16, 10, 0, 0],
  [0, 0, 0, 4, 15, 12, 0, 0, 0, 0, 3, 16, 15, 14, 0, 0, 0, 0, 8, 13, 8, 16, 0, 0, 0, 0, 1, 6, 15, 11, 0, 0,
   0, 1, 8, 13, 15, 1, 0, 0, 0, 9, 16, 16, 5, 0, 0, 0, 0, 3, 13, 16, 16, 11, 5, 0, 0, 0, 0, 3, 11, 16, 9, 0],
];
const KARATE_NODES = [0, 16, 33];
const EMBED_TEXTS = ["A man is playing a guitar.", "Someone plays the guitar."];
const SENTIMENT_TEXTS = ["I love this, it is wonderful!", "This is awful, I hate it."];
const WATCH_TIMEOUT_MS = 300_000;
const TERMINAL = new Set([
  training.JobState.JOB_STATE_SUCCEEDED,
  training.JobState.JOB_STATE_FAILED,
  training.JobState.JOB_STATE_CANCELLED,
]);

function emit(step: string, fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ step, ...fields }));
}

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0, aa = 0, bb = 0;
  a.forEach((x, i) => {
    dot += x * b[i];
    aa += x * x;
    bb += b[i] * b[i];
  });
  return dot / Math.sqrt(aa * bb);
}

async function main(target: string, runId: string): Promise<void> {
  const denseClient = new dense.DenseServiceClient(target, insecure);
  const gnnClient = new gnn.GnnServiceClient(target, insecure);
  const nlpClient = new nlp.NlpServiceClient(target, insecure);
  const trainingClient = new training.TrainingServiceClient(target, insecure);
  const densePredict = denseClient.predict.bind(denseClient);
  try {
    const digits = await unary(densePredict, dense.PredictRequest.fromPartial({
      modelName: "digits-mlp",
      inputs: { pixels: fp32Tensor(DIGITS) },
    }));
    emit("dense", {
      model: digits.modelName,
      version: digits.modelVersion,
      labels: int64s(digits.outputs.label, "label"),
    });

    const karate = await unary(gnnClient.predict.bind(gnnClient), gnn.PredictRequest.fromPartial({
      modelName: "karate-gcn",
      storedGraph: "karate",
      nodeIds: KARATE_NODES,
    }));
    emit("gnn", {
      model: karate.modelName,
      version: karate.modelVersion,
      node_ids: karate.nodeIds,
      labels: int64s(karate.outputs.label, "label"),
    });

    const nlpPredict = nlpClient.predict.bind(nlpClient);
    const embedded = await unary(nlpPredict, nlp.PredictRequest.fromPartial({
      modelName: "minilm-l6-v2",
      texts: EMBED_TEXTS,
    }));
    const embedding = float32s(embedded.outputs.embedding, "embedding");
    const [rows, width] = embedded.outputs.embedding.shape;
    emit("embed", {
      model: embedded.modelName,
      version: embedded.modelVersion,
      shape: embedded.outputs.embedding.shape,
      cosine: cosine(embedding.subarray(0, width), embedding.subarray(width, 2 * width)),
    });
    if (rows !== EMBED_TEXTS.length) throw new Error(`embed: expected ${EMBED_TEXTS.length} rows, got ${rows}`);

    const sentiment = await unary(nlpPredict, nlp.PredictRequest.fromPartial({
      modelName: "sentiment",
      texts: SENTIMENT_TEXTS,
    }));
    emit("classify", { model: sentiment.modelName, version: sentiment.modelVersion, labels: sentiment.labels });

    const submit = trainingClient.submitJob.bind(trainingClient);
    const { job: submitted } = await unary(submit, training.SubmitJobRequest.fromPartial({
      family: training.Family.FAMILY_DENSE,
      architecture: "mlp",
      optimizer: training.Optimizer.OPTIMIZER_ADAM,
      epochs: 3,
      builtinDataset: "iris",
      outputModel: "node-client-iris",
      idempotencyKey: runId,
    }));
    if (!submitted) throw new Error("SubmitJob returned no job");
    emit("submitted", { job_id: submitted.jobId, state: training.jobStateToJSON(submitted.state) });

    let last: training.JobState | undefined;
    const watch = trainingClient.watchJob.bind(trainingClient);
    const events = serverStream(watch, { jobId: submitted.jobId }, WATCH_TIMEOUT_MS);
    // grpc-js streams are Node Readables: async-iterable, with untyped items.
    for await (const { event } of events as AsyncIterable<training.WatchJobResponse>) {
      if (!event) continue;
      last = event.state;
      emit("event", {
        state: training.jobStateToJSON(event.state),
        epoch: event.epoch,
        epochs: event.epochs,
        train_loss: event.trainLoss,
      });
    }
    if (last === undefined || !TERMINAL.has(last)) throw new Error("WatchJob ended before the job finished");

    const { job } = await unary(trainingClient.getJob.bind(trainingClient), { jobId: submitted.jobId });
    if (!job) throw new Error("GetJob returned no job");
    emit("job", { state: training.jobStateToJSON(job.state), model_version: job.modelVersion, metrics: job.metrics });
    if (job.state !== training.JobState.JOB_STATE_SUCCEEDED) {
      throw new Error(`training job ${job.jobId} ended ${training.jobStateToJSON(job.state)}: ${job.error}`);
    }

    // 63 pixels where digits-mlp takes 64: the gateway must answer INVALID_ARGUMENT.
    try {
      await unary(densePredict, dense.PredictRequest.fromPartial({
        modelName: "digits-mlp",
        inputs: { pixels: fp32TensorOfShape(new Float32Array(63), [1, 63]) },
      }));
    } catch (error) {
      if (!isServiceError(error)) throw error;
      emit("bad_input", { code: error.code, code_name: status[error.code], details: error.details });
      if (error.code !== status.INVALID_ARGUMENT) {
        throw new Error(`bad input: expected INVALID_ARGUMENT, got ${status[error.code]}`);
      }
      return;
    }
    throw new Error("bad input: a [1, 63] pixels tensor was accepted");
  } finally {
    for (const client of [denseClient, gnnClient, nlpClient, trainingClient]) client.close();
  }
}

const [target, runId] = process.argv.slice(2);
if (!target || !runId) {
  console.error("usage: node scenario.js <gateway host:port> <run id>");
  process.exit(2);
}
main(target, runId).catch((error: unknown) => {
  if (isServiceError(error)) console.error(`scenario failed: ${status[error.code]}: ${error.details}`);
  else console.error("scenario failed:", error);
  process.exitCode = 1;
});
