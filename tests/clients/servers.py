"""Small real gRPC servers that misbehave on purpose, for the SDK's retry and reconnect tests."""

from __future__ import annotations

import threading
import time

import grpc

from maas.dense.v1 import dense_pb2, dense_pb2_grpc
from maas.training.v1 import training_pb2, training_pb2_grpc


class FlakyDense(dense_pb2_grpc.DenseServiceServicer):
    """A real gRPC server whose first `failures` Predict calls answer UNAVAILABLE."""

    def __init__(self, failures: int, delay_s: float = 0.0) -> None:
        self.failures = failures
        self.delay_s = delay_s
        self.attempts = 0
        self.deadlines: list[float | None] = []
        self.lock = threading.Lock()

    def Predict(self, request, context):
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
        self.deadlines.append(context.time_remaining())
        if attempt <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        time.sleep(self.delay_s)
        return dense_pb2.PredictResponse(model_name=request.model_name, model_version=7)


class DroppingTraining(training_pb2_grpc.TrainingServiceServicer):
    """A real TrainingService whose first WatchJob stream breaks with UNAVAILABLE after two events."""

    STATES = ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]

    def __init__(self) -> None:
        self.watches = 0

    def WatchJob(self, request, context):
        self.watches += 1
        for epoch, state in enumerate(self.STATES):
            if self.watches == 1 and epoch == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
            event = training_pb2.JobEvent(job_id=request.job_id, state=training_pb2.JobState.Value(state), epoch=epoch)
            yield training_pb2.WatchJobResponse(event=event)
