// Small helpers over the ts-proto stubs that `make stubs-ts` generates into build/stubs/ts:
// tensors to and from typed arrays, and unary and server-streaming calls with a deadline and
// the optional API key.

import {
  type CallOptions,
  type ClientReadableStream,
  type ClientUnaryCall,
  credentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";
import { DataType, type Tensor } from "../../../build/stubs/ts/maas/common/v1/tensor";

export * as dense from "../../../build/stubs/ts/maas/dense/v1/dense";
export * as gnn from "../../../build/stubs/ts/maas/gnn/v1/gnn";
export * as nlp from "../../../build/stubs/ts/maas/nlp/v1/nlp";
export * as training from "../../../build/stubs/ts/maas/training/v1/training";
export { DataType, type Tensor };

export const UNARY_TIMEOUT_MS = 30_000;

/** Plaintext credentials: the gateway the tests start listens without TLS. */
export const insecure = credentials.createInsecure();

/** `authorization: Bearer <key>` when MAAS_API_KEY is set, else no metadata. */
export function callMetadata(apiKey = process.env.MAAS_API_KEY): Metadata {
  const metadata = new Metadata();
  if (apiKey) metadata.set("authorization", `Bearer ${apiKey}`);
  return metadata;
}

function callOptions(timeoutMs: number): Partial<CallOptions> {
  return { deadline: Date.now() + timeoutMs };
}

type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => ClientUnaryCall;

/** Calls a unary method bound to its client, e.g. `unary(client.predict.bind(client), request)`. */
export function unary<Req, Res>(
  method: UnaryMethod<Req, Res>,
  request: Req,
  timeoutMs = UNARY_TIMEOUT_MS,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    method(request, callMetadata(), callOptions(timeoutMs), (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

type StreamMethod<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
) => ClientReadableStream<Res>;

/** Starts a server-streaming call; iterate it with `for await`, which throws on a non-OK status. */
export function serverStream<Req, Res>(
  method: StreamMethod<Req, Res>,
  request: Req,
  timeoutMs: number,
): ClientReadableStream<Res> {
  return method(request, callMetadata(), callOptions(timeoutMs));
}

/** A gRPC error, as opposed to any other exception. */
export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof Error && typeof (error as Partial<ServiceError>).code === "number";
}

const ITEM_SIZE: Partial<Record<DataType, number>> = {
  [DataType.DATA_TYPE_FP32]: 4,
  [DataType.DATA_TYPE_INT64]: 8,
};

/** A row-major FP32 tensor; rows must all have the same length. */
export function fp32Tensor(rows: readonly (readonly number[])[]): Tensor {
  const width = rows[0]?.length ?? 0;
  if (rows.some((row) => row.length !== width)) throw new Error("fp32Tensor: ragged rows");
  return fp32TensorOfShape(Float32Array.from(rows.flat()), [rows.length, width]);
}

export function fp32TensorOfShape(values: Float32Array, shape: number[]): Tensor {
  const data = Buffer.alloc(values.length * 4);
  values.forEach((value, i) => data.writeFloatLE(value, i * 4));
  return { dtype: DataType.DATA_TYPE_FP32, shape, data };
}

/** Checks a tensor's dtype and that its bytes match its shape; returns the element count. */
function elements(tensor: Tensor | undefined, dtype: DataType, name: string): number {
  if (!tensor) throw new Error(`output "${name}" is missing`);
  if (tensor.dtype !== dtype) {
    throw new Error(`output "${name}": expected ${DataType[dtype]}, got ${DataType[tensor.dtype] ?? tensor.dtype}`);
  }
  const count = tensor.shape.reduce((product, dim) => product * dim, 1);
  if (tensor.data.length !== count * (ITEM_SIZE[dtype] ?? 0)) {
    throw new Error(`output "${name}": shape [${tensor.shape}] does not match ${tensor.data.length} bytes`);
  }
  return count;
}

// Buffer's readers take any byte offset; a Float32Array view over tensor.data would need the
// protobuf buffer to be 4-byte aligned and the host to be little-endian.
export function float32s(tensor: Tensor | undefined, name: string): Float32Array {
  const count = elements(tensor, DataType.DATA_TYPE_FP32, name);
  return Float32Array.from({ length: count }, (_, i) => tensor!.data.readFloatLE(i * 4));
}

/** INT64 elements as numbers; throws past Number.MAX_SAFE_INTEGER rather than lose precision. */
export function int64s(tensor: Tensor | undefined, name: string): number[] {
  const count = elements(tensor, DataType.DATA_TYPE_INT64, name);
  return Array.from({ length: count }, (_, i) => {
    const value = tensor!.data.readBigInt64LE(i * 8);
    if (value > BigInt(Number.MAX_SAFE_INTEGER) || value < BigInt(Number.MIN_SAFE_INTEGER)) {
      throw new Error(`output "${name}"[${i}] = ${value} does not fit a JavaScript number`);
    }
    return Number(value);
  });
}
