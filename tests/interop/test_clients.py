"""Go, Node.js and grpcurl clients, and the examples of docs/clients.md, against the real services.

One stack serves the whole module: the tokenizer, forward and orchestrator
services as separate processes, started by the launcher as `loftey serve` starts
them, on a small random-weights model with the real Qwen tokenizer. The experts
run in the forward process (executor "local"): these tests are about the public
API, and Ray would only add start-up time and memory. The Python client's
results are the reference every other client must reproduce.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from interop_tools import NODE_DIR, REPO_ROOT, TOOL_TIMEOUT_S, run_checked

from loftey.client import Completion, LofteyClient, LofteyError, ModelInfo
from loftey.launcher import StackConfig, run_stack, with_default_tokenizer
from loftey.model.dummy import tiny_config, write_dummy_checkpoint

pytestmark = pytest.mark.slow

# Qwen's tokenizer, its three special tokens included: chat prompts contain
# <|im_start|> (151644), so the model must cover the whole vocabulary.
QWEN_VOCAB_SIZE = 151_646
PROMPT = "Hello"
MAX_NEW_TOKENS = 16
# top_p must be in [0, 1], so every client sends this value as its invalid request.
INVALID_TOP_P = 1.5

DOCS_PATH = REPO_ROOT / "docs" / "clients.md"
# The address the docs' examples use. The tests replace it with the live server's.
DOCS_ADDRESS = "127.0.0.1:50051"
# What every docs example requests: a greedy reply of at most 32 tokens to "Hello".
DOCS_MAX_NEW_TOKENS = 32
DOCS_EXAMPLES = {"python", "go", "node", "grpcurl-list", "grpcurl-describe", "grpcurl-generate"}
# A marked example is an HTML comment followed by a fenced code block.
DOCS_EXAMPLE_PATTERN = re.compile(r"^<!-- interop-test: ([\w-]+) -->\n```\w+\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def server_address(tmp_path_factory) -> str:
    model_dir = tmp_path_factory.mktemp("interop-model")
    write_dummy_checkpoint(model_dir, tiny_config(vocab_size=QWEN_VOCAB_SIZE), seed=7)
    with_default_tokenizer(model_dir)
    config = StackConfig(
        model=str(model_dir),
        port=0,
        executor="local",
        expert_groups=1,
        log_dir=tmp_path_factory.mktemp("interop-logs"),
    )
    with run_stack(config) as services:
        yield f"{config.host}:{services[-1].port}"


@pytest.fixture(scope="module")
def python_client(server_address):
    with LofteyClient(server_address) as client:
        yield client


@pytest.fixture(scope="module")
def python_reply(python_client) -> Completion:
    return python_client.chat(PROMPT, temperature=0, max_new_tokens=MAX_NEW_TOKENS, seed=1)


@pytest.fixture(scope="module")
def python_error(python_client) -> LofteyError:
    with pytest.raises(LofteyError) as caught:
        python_client.chat(PROMPT, top_p=INVALID_TOP_P, max_new_tokens=1)
    return caught.value


@pytest.fixture(scope="module")
def python_model_info(python_client) -> ModelInfo:
    return python_client.model_info()


@pytest.fixture(scope="module", params=["go", "node"])
def client_report(request, server_address) -> dict:
    """The JSON report of tests/interop/go/cmd/interop or tests/interop/node/client.js."""
    if request.param == "go":
        binary = request.getfixturevalue("go_build")("./cmd/interop")
        command = [str(binary), "-addr", server_address, "-prompt", PROMPT, "-max-new-tokens", str(MAX_NEW_TOKENS)]
    else:
        request.getfixturevalue("node_modules")
        command = [
            "node", str(NODE_DIR / "client.js"),
            "--addr", server_address, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS),
        ]
    return json.loads(run_checked(command).stdout)


def finish_reason_name(completion: Completion) -> str:
    """The proto enum name of a Python Completion's finish reason ("length" -> "FINISH_REASON_LENGTH")."""
    return f"FINISH_REASON_{completion.finish_reason.upper()}"


def test_client_greedy_output_matches_python(client_report, python_reply):
    generated = client_report["generate"]

    assert generated["token_ids"] == python_reply.token_ids
    assert generated["text"] == python_reply.text
    assert generated["finish_reason"] == finish_reason_name(python_reply)


def test_client_stream_joins_to_unary_text(client_report):
    unary = client_report["generate"]
    stream = client_report["stream"]

    assert stream["text"] == unary["text"]
    assert stream["token_ids"] == unary["token_ids"]
    assert stream["finish_reason"] == unary["finish_reason"]
    assert stream["messages"] >= 1
    # Only the last message may carry a finish reason.
    assert stream["early_finish_reasons"] == 0


def test_client_bad_request_names_field(client_report, python_error):
    error = client_report["bad_request"]

    assert error["code"] == "INVALID_ARGUMENT"
    assert "sampling.top_p" in error["message"]
    assert str(INVALID_TOP_P) in error["message"]
    assert error["message"] == python_error.message


def test_client_model_info_matches_python(client_report, python_model_info):
    info = client_report["model_info"]

    assert info["model_id"] == python_model_info.model_id
    assert info["model_type"] == "loftey"
    assert info["vocab_size"] == QWEN_VOCAB_SIZE
    assert info["max_seq_len"] == python_model_info.max_seq_len
    assert info["eos_token_ids"] == python_model_info.eos_token_ids


@pytest.fixture(scope="module")
def grpcurl(go_tools) -> Path:
    return go_tools["grpcurl"]


def test_grpcurl_lists_generation_through_reflection(grpcurl, server_address):
    result = run_checked([str(grpcurl), "-plaintext", server_address, "list"])

    assert "loftey.v1.Generation" in result.stdout.splitlines()


def test_grpcurl_describes_generate_request(grpcurl, server_address):
    result = run_checked([str(grpcurl), "-plaintext", server_address, "describe", "loftey.v1.GenerateRequest"])

    assert "message GenerateRequest {" in result.stdout
    assert ".loftey.v1.Prompt prompt = 2;" in result.stdout


def test_grpcurl_generate_matches_python(grpcurl, server_address, python_reply):
    body = {
        "prompt": {"messages": {"messages": [{"role": "user", "content": PROMPT}]}},
        "sampling": {"temperature": 0},
        "stopping": {"max_new_tokens": MAX_NEW_TOKENS},
    }
    result = run_checked(
        [str(grpcurl), "-plaintext", "-d", json.dumps(body), server_address, "loftey.v1.Generation/Generate"]
    )
    response = json.loads(result.stdout)

    assert response["token_ids"] == python_reply.token_ids
    assert response["text"] == python_reply.text
    assert response["finish_reason"] == finish_reason_name(python_reply)


def test_grpcurl_bad_request_names_field(grpcurl, server_address):
    body = {"prompt": {"text": PROMPT}, "sampling": {"top_p": INVALID_TOP_P}}
    result = subprocess.run(
        [str(grpcurl), "-plaintext", "-d", json.dumps(body), server_address, "loftey.v1.Generation/Generate"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
    )

    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "sampling.top_p" in result.stderr


# The examples of docs/clients.md.


@pytest.fixture(scope="module")
def docs_examples() -> dict[str, str]:
    """The marked code blocks of docs/clients.md by name, with the live address still DOCS_ADDRESS."""
    return {name: code for name, code in DOCS_EXAMPLE_PATTERN.findall(DOCS_PATH.read_text())}


@pytest.fixture(scope="module")
def docs_expected_output(python_client) -> str:
    """What the Python, Go and Node.js examples must print: reply, streamed reply, error."""
    reply = python_client.chat(PROMPT, temperature=0, max_new_tokens=DOCS_MAX_NEW_TOKENS)
    with pytest.raises(LofteyError) as caught:
        python_client.chat(PROMPT, top_p=INVALID_TOP_P)
    return f"{reply.text}\n{reply.text}\nINVALID_ARGUMENT: {caught.value.message}\n"


def example_for(docs_examples: dict[str, str], name: str, server_address: str) -> str:
    return docs_examples[name].replace(DOCS_ADDRESS, server_address)


def run_example(command: list[str], *, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None) -> str:
    """Run an example and return its stdout exactly (no newline translation)."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def test_docs_mark_every_example(docs_examples):
    assert set(docs_examples) == DOCS_EXAMPLES
    for name, code in docs_examples.items():
        assert DOCS_ADDRESS in code, f"example {name} does not use {DOCS_ADDRESS}"


def test_docs_python_example(docs_examples, server_address, docs_expected_output, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(example_for(docs_examples, "python", server_address))

    output = run_example([sys.executable, str(script)])

    assert output == docs_expected_output


def test_docs_go_example(docs_examples, server_address, docs_expected_output, go_build, tmp_path):
    source = tmp_path / "main.go"
    source.write_text(docs_examples["go"])
    formatting = run_checked(["gofmt", "-l", str(source)])
    source.write_text(example_for(docs_examples, "go", server_address))

    # Built as if it were cmd/docs-example/main.go of the interop module, which
    # has the generated loftey.v1 package, without writing it into the tree.
    module_path = REPO_ROOT / "tests" / "interop" / "go" / "cmd" / "docs-example" / "main.go"
    binary = go_build("./cmd/docs-example", overlay={module_path: source})
    output = run_example([str(binary)])

    assert formatting.stdout == "", "the Go example is not gofmt-formatted"
    assert output == docs_expected_output


def test_docs_node_example(docs_examples, server_address, docs_expected_output, node_modules, tmp_path):
    script = tmp_path / "example.js"
    script.write_text(example_for(docs_examples, "node", server_address))

    # Run from the repository root, as the example's comment requires, finding the packages
    # installed for tests/interop/node.
    output = run_example(["node", str(script)], env={**os.environ, "NODE_PATH": str(node_modules)})

    assert output == docs_expected_output


def test_docs_grpcurl_examples(docs_examples, server_address, grpcurl, python_client):
    env = {**os.environ, "PATH": os.pathsep.join([str(grpcurl.parent), os.environ["PATH"]])}

    def run_block(name: str) -> str:
        return run_example(["bash", "-euo", "pipefail", "-c", example_for(docs_examples, name, server_address)], env=env)

    services = run_block("grpcurl-list")
    description = run_block("grpcurl-describe")
    response = json.loads(run_block("grpcurl-generate"))
    reply = python_client.chat(PROMPT, temperature=0, max_new_tokens=DOCS_MAX_NEW_TOKENS)

    assert "loftey.v1.Generation" in services.splitlines()
    assert "message GenerateRequest {" in description
    assert response["text"] == reply.text
    assert response["token_ids"] == reply.token_ids
