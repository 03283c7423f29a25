// Command scenario runs the client scenario of tests/clients/scenario.py against a maas gateway,
// with the Go stubs `make stubs-go` generates:
//
//	scenario <gateway host:port> <run id>
//
// It prints one JSON line per step and exits 0 only when every step worked. When MAAS_API_KEY
// is set, every call carries `authorization: Bearer <key>`.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	commonv1 "github.com/maas-project/maas/gen/go/maas/common/v1"
	densev1 "github.com/maas-project/maas/gen/go/maas/dense/v1"
	gnnv1 "github.com/maas-project/maas/gen/go/maas/gnn/v1"
	nlpv1 "github.com/maas-project/maas/gen/go/maas/nlp/v1"
	trainingv1 "github.com/maas-project/maas/gen/go/maas/training/v1"
)

const (
	unaryTimeout = 30 * time.Second
	watchTimeout = 300 * time.Second
)

// The first three scikit-learn digits (labels 0, 1, 2), 8x8 pixels valued 0..16.
var digits = [][]float32{
	{0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
		0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0},
	{0, 0, 0, 12, 13, 5, 0, 0, 0, 0, 0, 11, 16, 9, 0, 0, 0, 0, 3, 15, 16, 6, 0, 0, 0, 7, 15, 16, 16, 2, 0, 0,
		0, 0, 1, 16, 16, 3, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 1, 16, 16, 6, 0, 0, 0, 0, 0, 11, 16, 10, 0, 0},
	{0, 0, 0, 4, 15, 12, 0, 0, 0, 0, 3, 16, 15, 14, 0, 0, 0, 0, 8, 13, 8, 16, 0, 0, 0, 0, 1, 6, 15, 11, 0, 0,
		0, 1, 8, 13, 15, 1, 0, 0, 0, 9, 16, 16, 5, 0, 0, 0, 0, 3, 13, 16, 16, 11, 5, 0, 0, 0, 0, 3, 11, 16, 9, 0},
}

var (
	karateNodes    = []int64{0, 16, 33}
	embedTexts     = []string{"A man is playing a guitar.", "Someone plays the guitar."}
	sentimentTexts = []string{"I love this, it is wonderful!", "This is awful, I hate it."}
)

// call returns a context with a deadline and, when MAAS_API_KEY is set, the API key.
func call(timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	if key := os.Getenv("MAAS_API_KEY"); key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
	}
	return ctx, cancel
}

func emit(step string, fields map[string]interface{}) {
	fields["step"] = step
	line, err := json.Marshal(fields)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(line))
}

// fp32Tensor encodes rows of equal length as a row-major, little-endian FP32 tensor.
func fp32Tensor(rows [][]float32) *commonv1.Tensor {
	width := len(rows[0])
	data := make([]byte, 0, 4*width*len(rows))
	for _, row := range rows {
		for _, value := range row {
			data = binary.LittleEndian.AppendUint32(data, math.Float32bits(value))
		}
	}
	return &commonv1.Tensor{Dtype: commonv1.DataType_DATA_TYPE_FP32, Shape: []int64{int64(len(rows)), int64(width)}, Data: data}
}

// elements checks a tensor's dtype and that its bytes match its shape.
func elements(t *commonv1.Tensor, dtype commonv1.DataType, size int, name string) (int, error) {
	if t == nil {
		return 0, fmt.Errorf("output %q is missing", name)
	}
	if t.Dtype != dtype {
		return 0, fmt.Errorf("output %q: expected %s, got %s", name, dtype, t.Dtype)
	}
	count := 1
	for _, dim := range t.Shape {
		count *= int(dim)
	}
	if len(t.Data) != count*size {
		return 0, fmt.Errorf("output %q: shape %v does not match %d bytes", name, t.Shape, len(t.Data))
	}
	return count, nil
}

func int64s(t *commonv1.Tensor, name string) ([]int64, error) {
	count, err := elements(t, commonv1.DataType_DATA_TYPE_INT64, 8, name)
	values := make([]int64, count)
	for i := range values {
		values[i] = int64(binary.LittleEndian.Uint64(t.Data[8*i:]))
	}
	return values, err
}

func float32s(t *commonv1.Tensor, name string) ([]float32, error) {
	count, err := elements(t, commonv1.DataType_DATA_TYPE_FP32, 4, name)
	values := make([]float32, count)
	for i := range values {
		values[i] = math.Float32frombits(binary.LittleEndian.Uint32(t.Data[4*i:]))
	}
	return values, err
}

func run(target, runID string) error {
	// Debian's grpc-go (1.33) predates credentials/insecure; the test gateway is plaintext.
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	dense := densev1.NewDenseServiceClient(conn)
	gnn := gnnv1.NewGnnServiceClient(conn)
	nlp := nlpv1.NewNlpServiceClient(conn)
	training := trainingv1.NewTrainingServiceClient(conn)

	ctx, cancel := call(unaryTimeout)
	defer cancel()
	digitsReply, err := dense.Predict(ctx, &densev1.PredictRequest{
		ModelName: "digits-mlp",
		Inputs:    map[string]*commonv1.Tensor{"pixels": fp32Tensor(digits)},
	})
	if err != nil {
		return fmt.Errorf("dense predict: %w", err)
	}
	labels, err := int64s(digitsReply.Outputs["label"], "label")
	if err != nil {
		return err
	}
	emit("dense", map[string]interface{}{"model": digitsReply.ModelName, "version": digitsReply.ModelVersion, "labels": labels})

	karate, err := gnn.Predict(ctx, &gnnv1.PredictRequest{
		ModelName:   "karate-gcn",
		GraphSource: &gnnv1.PredictRequest_StoredGraph{StoredGraph: "karate"},
		NodeIds:     karateNodes,
	})
	if err != nil {
		return fmt.Errorf("gnn predict: %w", err)
	}
	communities, err := int64s(karate.Outputs["label"], "label")
	if err != nil {
		return err
	}
	emit("gnn", map[string]interface{}{
		"model": karate.ModelName, "version": karate.ModelVersion, "node_ids": karate.NodeIds, "labels": communities,
	})

	embedded, err := nlp.Predict(ctx, &nlpv1.PredictRequest{ModelName: "minilm-l6-v2", Texts: embedTexts})
	if err != nil {
		return fmt.Errorf("embed: %w", err)
	}
	vectors, err := float32s(embedded.Outputs["embedding"], "embedding")
	if err != nil {
		return err
	}
	shape := embedded.Outputs["embedding"].Shape
	if len(shape) != 2 || shape[0] != 2 {
		return fmt.Errorf("embedding: expected 2 rows, got shape %v", shape)
	}
	dim := int(shape[1])
	var dot, aa, bb float64
	for i := 0; i < dim; i++ {
		a, b := float64(vectors[i]), float64(vectors[dim+i])
		dot, aa, bb = dot+a*b, aa+a*a, bb+b*b
	}
	emit("embed", map[string]interface{}{
		"model": embedded.ModelName, "version": embedded.ModelVersion, "shape": shape, "cosine": dot / math.Sqrt(aa*bb),
	})

	sentiment, err := nlp.Predict(ctx, &nlpv1.PredictRequest{ModelName: "sentiment", Texts: sentimentTexts})
	if err != nil {
		return fmt.Errorf("classify: %w", err)
	}
	emit("classify", map[string]interface{}{"model": sentiment.ModelName, "version": sentiment.ModelVersion, "labels": sentiment.Labels})

	if err := train(training, runID); err != nil {
		return err
	}
	return badInput(dense)
}

// train submits a 3-epoch iris MLP, follows its events to the end, and reports the final job.
func train(training trainingv1.TrainingServiceClient, runID string) error {
	ctx, cancel := call(unaryTimeout)
	defer cancel()
	submitted, err := training.SubmitJob(ctx, &trainingv1.SubmitJobRequest{
		Family:         trainingv1.Family_FAMILY_DENSE,
		Architecture:   "mlp",
		Optimizer:      trainingv1.Optimizer_OPTIMIZER_ADAM,
		Epochs:         3,
		Data:           &trainingv1.SubmitJobRequest_BuiltinDataset{BuiltinDataset: "iris"},
		OutputModel:    "go-client-iris",
		IdempotencyKey: runID,
	})
	if err != nil {
		return fmt.Errorf("submit: %w", err)
	}
	job := submitted.Job
	emit("submitted", map[string]interface{}{"job_id": job.JobId, "state": job.State.String()})

	watchCtx, cancelWatch := call(watchTimeout)
	defer cancelWatch()
	stream, err := training.WatchJob(watchCtx, &trainingv1.WatchJobRequest{JobId: job.JobId})
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	final := trainingv1.JobState_JOB_STATE_UNSPECIFIED
	for {
		reply, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		event := reply.Event
		final = event.State
		emit("event", map[string]interface{}{
			"state": event.State.String(), "epoch": event.Epoch, "epochs": event.Epochs, "train_loss": event.TrainLoss,
		})
	}
	if final != trainingv1.JobState_JOB_STATE_SUCCEEDED {
		return fmt.Errorf("job %s ended %s", job.JobId, final)
	}
	done, err := training.GetJob(ctx, &trainingv1.GetJobRequest{JobId: job.JobId})
	if err != nil {
		return fmt.Errorf("get job: %w", err)
	}
	emit("job", map[string]interface{}{
		"state": done.Job.State.String(), "model_version": done.Job.ModelVersion, "metrics": done.Job.Metrics,
	})
	return nil
}

// badInput sends 63 pixels where digits-mlp takes 64, and expects INVALID_ARGUMENT.
func badInput(dense densev1.DenseServiceClient) error {
	ctx, cancel := call(unaryTimeout)
	defer cancel()
	_, err := dense.Predict(ctx, &densev1.PredictRequest{
		ModelName: "digits-mlp",
		Inputs:    map[string]*commonv1.Tensor{"pixels": fp32Tensor([][]float32{make([]float32, 63)})},
	})
	if err == nil {
		return errors.New("bad input: a 63-pixel digit was accepted")
	}
	st := status.Convert(err)
	emit("bad_input", map[string]interface{}{"code": int(st.Code()), "code_name": codeName(st.Code()), "details": st.Message()})
	if st.Code() != codes.InvalidArgument {
		return fmt.Errorf("bad input: expected INVALID_ARGUMENT, got %s", st.Code())
	}
	return nil
}

// codeName spells a status code as the gRPC spec does (codes.Code's String is CamelCase).
func codeName(code codes.Code) string {
	names := map[codes.Code]string{
		codes.InvalidArgument: "INVALID_ARGUMENT", codes.NotFound: "NOT_FOUND", codes.Unavailable: "UNAVAILABLE",
		codes.Unauthenticated: "UNAUTHENTICATED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
		codes.DeadlineExceeded: "DEADLINE_EXCEEDED", codes.FailedPrecondition: "FAILED_PRECONDITION",
	}
	if name, ok := names[code]; ok {
		return name
	}
	return code.String()
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: scenario <gateway host:port> <run id>")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "scenario failed:", err)
		os.Exit(1)
	}
}
