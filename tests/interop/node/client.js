// Calls every public RPC of a Loftey server that a client needs
// (GetModelInfo, Generate, GenerateStream) plus one invalid request, and
// prints what came back as one JSON object on stdout. tests/interop compares
// that report with the Python client's results. This program only reports.
//
//   node client.js --addr 127.0.0.1:50051 --prompt Hello --max-new-tokens 16
"use strict";

const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "..", "proto");
// Outside top_p's documented range [0, 1], so the server must reject it with
// INVALID_ARGUMENT naming sampling.top_p.
const INVALID_TOP_P = 1.5;

function loadGenerationService() {
  const definition = protoLoader.loadSync("loftey/v1/generation.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    // uint64 fields (seed, parameter_count) as strings, so no precision is lost.
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).loftey.v1.Generation;
}

function buildRequest(prompt, maxNewTokens, seed) {
  return {
    prompt: { messages: { messages: [{ role: "user", content: prompt }] } },
    // Temperature 0 is greedy decoding, so every client must get the same tokens.
    sampling: { temperature: 0, seed: String(seed) },
    stopping: { max_new_tokens: maxNewTokens },
  };
}

function unary(client, method, request, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

async function generate(client, request, deadline) {
  const response = await unary(client, "Generate", request, deadline);
  return {
    text: response.text,
    token_ids: response.token_ids,
    finish_reason: response.finish_reason,
    messages: 1,
    early_finish_reasons: 0,
  };
}

async function generateStream(client, request, deadline) {
  const result = { text: "", token_ids: [], finish_reason: "", messages: 0, early_finish_reasons: 0 };
  let finish = "FINISH_REASON_UNSPECIFIED";
  // A stream is async-iterable, and an error status is thrown from the loop.
  for await (const message of client.GenerateStream(request, { deadline })) {
    if (finish !== "FINISH_REASON_UNSPECIFIED") {
      result.early_finish_reasons += 1;
    }
    result.messages += 1;
    result.text += message.text;
    result.token_ids.push(...message.token_ids);
    finish = message.finish_reason;
  }
  result.finish_reason = finish;
  return result;
}

async function sendBadRequest(client, prompt, deadline) {
  const request = buildRequest(prompt, 1, 0);
  request.sampling.top_p = INVALID_TOP_P;
  try {
    await unary(client, "Generate", request, deadline);
  } catch (error) {
    return { code: grpc.status[error.code], message: error.details };
  }
  throw new Error(`Generate with top_p ${INVALID_TOP_P} succeeded, but the server must reject it with INVALID_ARGUMENT`);
}

async function main() {
  const { values } = parseArgs({
    options: {
      addr: { type: "string", default: "127.0.0.1:50051" },
      prompt: { type: "string", default: "Hello" },
      "max-new-tokens": { type: "string", default: "16" },
      seed: { type: "string", default: "1" },
      "timeout-s": { type: "string", default: "120" },
    },
  });
  const maxNewTokens = Number.parseInt(values["max-new-tokens"], 10);
  const deadline = Date.now() + 1000 * Number(values["timeout-s"]);

  const Generation = loadGenerationService();
  const client = new Generation(values.addr, grpc.credentials.createInsecure());
  try {
    const info = await unary(client, "GetModelInfo", {}, deadline);
    const request = buildRequest(values.prompt, maxNewTokens, values.seed);
    const report = {
      model_info: {
        model_id: info.model_id,
        model_type: info.model_type,
        vocab_size: info.vocab_size,
        max_seq_len: info.max_seq_len,
        eos_token_ids: info.eos_token_ids,
      },
      generate: await generate(client, request, deadline),
      stream: await generateStream(client, request, deadline),
      bad_request: await sendBadRequest(client, values.prompt, deadline),
    };
    process.stdout.write(JSON.stringify(report, null, 2) + "\n");
  } finally {
    client.close();
  }
}

main().catch((error) => {
  console.error(error instanceof Error ? error.message : error);
  process.exitCode = 1;
});
