// Command interop calls every public RPC of a Loftey server that a client
// needs (GetModelInfo, Generate, GenerateStream) plus one invalid request, and
// prints what came back as one JSON object on stdout. tests/interop compares
// that report with the Python client's results. This program only reports.
//
//	go run ./cmd/interop -addr 127.0.0.1:50051 -prompt "Hello" -max-new-tokens 16
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"time"

	lofteyv1 "github.com/loftey/loftey-serving/gen/go/loftey/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// invalidTopP is outside top_p's documented range [0, 1], so the server must
// reject it with INVALID_ARGUMENT naming sampling.top_p.
const invalidTopP = 1.5

type modelInfoReport struct {
	ModelID     string   `json:"model_id"`
	ModelType   string   `json:"model_type"`
	VocabSize   uint32   `json:"vocab_size"`
	MaxSeqLen   uint32   `json:"max_seq_len"`
	EOSTokenIDs []uint32 `json:"eos_token_ids"`
}

type generationReport struct {
	Text         string   `json:"text"`
	TokenIDs     []uint32 `json:"token_ids"`
	FinishReason string   `json:"finish_reason"`
	// Messages received, 1 for a unary call.
	Messages int `json:"messages"`
	// Stream messages before the last one that had a finish reason set. The
	// API allows none.
	EarlyFinishReasons int `json:"early_finish_reasons"`
}

type errorReport struct {
	// The gRPC status code as its canonical name, e.g. "INVALID_ARGUMENT".
	Code    string `json:"code"`
	Message string `json:"message"`
}

type report struct {
	ModelInfo  modelInfoReport  `json:"model_info"`
	Generate   generationReport `json:"generate"`
	Stream     generationReport `json:"stream"`
	BadRequest errorReport      `json:"bad_request"`
}

// canonicalCodeName turns codes.InvalidArgument ("InvalidArgument") into the
// name every gRPC implementation shares ("INVALID_ARGUMENT").
func canonicalCodeName(err error) string {
	name := status.Code(err).String()
	var out strings.Builder
	for i, r := range name {
		if i > 0 && r >= 'A' && r <= 'Z' {
			out.WriteByte('_')
		}
		out.WriteRune(r)
	}
	return strings.ToUpper(out.String())
}

func buildRequest(prompt string, maxNewTokens uint32, seed uint64) (*lofteyv1.Prompt, *lofteyv1.SamplingParams, *lofteyv1.StoppingParams) {
	chat := &lofteyv1.Prompt{Kind: &lofteyv1.Prompt_Messages{Messages: &lofteyv1.ChatMessages{
		Messages: []*lofteyv1.ChatMessage{{Role: "user", Content: prompt}},
	}}}
	// Temperature 0 is greedy decoding, so every client must get the same tokens.
	sampling := &lofteyv1.SamplingParams{Temperature: proto.Float32(0), Seed: proto.Uint64(seed)}
	stopping := &lofteyv1.StoppingParams{MaxNewTokens: proto.Uint32(maxNewTokens)}
	return chat, sampling, stopping
}

func generate(ctx context.Context, client lofteyv1.GenerationClient, prompt string, maxNewTokens uint32, seed uint64) (generationReport, error) {
	chat, sampling, stopping := buildRequest(prompt, maxNewTokens, seed)
	response, err := client.Generate(ctx, &lofteyv1.GenerateRequest{Prompt: chat, Sampling: sampling, Stopping: stopping})
	if err != nil {
		return generationReport{}, fmt.Errorf("Generate failed: %w", err)
	}
	return generationReport{
		Text:         response.GetText(),
		TokenIDs:     response.GetTokenIds(),
		FinishReason: response.GetFinishReason().String(),
		Messages:     1,
	}, nil
}

func generateStream(ctx context.Context, client lofteyv1.GenerationClient, prompt string, maxNewTokens uint32, seed uint64) (generationReport, error) {
	chat, sampling, stopping := buildRequest(prompt, maxNewTokens, seed)
	stream, err := client.GenerateStream(ctx, &lofteyv1.GenerateStreamRequest{Prompt: chat, Sampling: sampling, Stopping: stopping})
	if err != nil {
		return generationReport{}, fmt.Errorf("GenerateStream failed: %w", err)
	}

	result := generationReport{TokenIDs: []uint32{}}
	var text strings.Builder
	finish := lofteyv1.FinishReason_FINISH_REASON_UNSPECIFIED
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return generationReport{}, fmt.Errorf("GenerateStream failed after %d messages: %w", result.Messages, err)
		}
		if finish != lofteyv1.FinishReason_FINISH_REASON_UNSPECIFIED {
			result.EarlyFinishReasons++
		}
		result.Messages++
		text.WriteString(message.GetText())
		result.TokenIDs = append(result.TokenIDs, message.GetTokenIds()...)
		finish = message.GetFinishReason()
	}
	result.Text = text.String()
	result.FinishReason = finish.String()
	return result, nil
}

func sendBadRequest(ctx context.Context, client lofteyv1.GenerationClient, prompt string) (errorReport, error) {
	chat, sampling, stopping := buildRequest(prompt, 1, 0)
	sampling.TopP = proto.Float32(invalidTopP)
	_, err := client.Generate(ctx, &lofteyv1.GenerateRequest{Prompt: chat, Sampling: sampling, Stopping: stopping})
	if err == nil {
		return errorReport{}, fmt.Errorf("Generate with top_p %g succeeded, but the server must reject it with INVALID_ARGUMENT", invalidTopP)
	}
	return errorReport{Code: canonicalCodeName(err), Message: status.Convert(err).Message()}, nil
}

func run(address, prompt string, maxNewTokens uint32, seed uint64, timeout time.Duration) (report, error) {
	connection, err := grpc.NewClient(address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return report{}, fmt.Errorf("invalid address %q: %w", address, err)
	}
	defer connection.Close()
	client := lofteyv1.NewGenerationClient(connection)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	var result report
	info, err := client.GetModelInfo(ctx, &lofteyv1.GetModelInfoRequest{})
	if err != nil {
		return report{}, fmt.Errorf("GetModelInfo failed: %w", err)
	}
	result.ModelInfo = modelInfoReport{
		ModelID:     info.GetModelId(),
		ModelType:   info.GetModelType(),
		VocabSize:   info.GetVocabSize(),
		MaxSeqLen:   info.GetMaxSeqLen(),
		EOSTokenIDs: info.GetEosTokenIds(),
	}
	if result.Generate, err = generate(ctx, client, prompt, maxNewTokens, seed); err != nil {
		return report{}, err
	}
	if result.Stream, err = generateStream(ctx, client, prompt, maxNewTokens, seed); err != nil {
		return report{}, err
	}
	if result.BadRequest, err = sendBadRequest(ctx, client, prompt); err != nil {
		return report{}, err
	}
	return result, nil
}

func main() {
	address := flag.String("addr", "127.0.0.1:50051", "server address, host:port")
	prompt := flag.String("prompt", "Hello", "text of the one user chat message")
	maxNewTokens := flag.Uint("max-new-tokens", 16, "maximum number of tokens to generate")
	seed := flag.Uint64("seed", 1, "seed sent with the requests (greedy decoding ignores it)")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline for all calls together")
	flag.Parse()

	result, err := run(*address, *prompt, uint32(*maxNewTokens), *seed, *timeout)
	if err != nil {
		log.Fatal(err)
	}
	encoder := json.NewEncoder(os.Stdout)
	encoder.SetIndent("", "  ")
	if err := encoder.Encode(result); err != nil {
		log.Fatalf("writing the report failed: %v", err)
	}
}
