"""Command-line use of a running server: `loftey generate --server ADDR` and `loftey chat`.

Only typer and the standard library are imported at the top, so `loftey --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer

if TYPE_CHECKING:
    from loftey.client import LofteyClient

DEFAULT_SERVER = "127.0.0.1:50051"
# Environment variable read for the bearer token when no --token-file is given.
TOKEN_ENV = "LOFTEY_API_TOKEN"

TokenFileOption = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help=f"File with the bearer token to send (its first token line). Default: the {TOKEN_ENV} environment variable.",
    ),
]
TlsOption = Annotated[bool, typer.Option("--tls", help="Connect over TLS, trusting the system's CAs.")]
TlsCaOption = Annotated[
    Path | None, typer.Option("--tls-ca", help="PEM CA that signed the server's certificate; implies --tls.")
]
TlsCertOption = Annotated[
    Path | None, typer.Option("--tls-cert", help="PEM client certificate, for a server that requires one.")
]
TlsKeyOption = Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")]


@dataclass(frozen=True)
class Connection:
    """Address, TLS files and bearer-token source of the server a command calls."""

    server: str
    token_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def uses_tls(self) -> bool:
        return self.tls or any(path is not None for path in (self.tls_ca, self.tls_cert, self.tls_key))

    def open(self) -> LofteyClient:
        """Open a client; raise typer.BadParameter for an unusable token or TLS file."""
        from loftey.client import LofteyClient

        token = self.token()
        if token is not None and not self.uses_tls() and not _is_local(self.server):
            typer.echo(f"warning: sending the bearer token to {self.server} without TLS; pass --tls or --tls-ca",
                       err=True)
        try:
            return LofteyClient(
                self.server, token=token, tls=self.tls, tls_ca=self.tls_ca,
                tls_cert=self.tls_cert, tls_key=self.tls_key,
            )
        except (ValueError, OSError) as error:
            raise typer.BadParameter(str(error), param_hint="--tls-ca/--tls-cert/--tls-key") from error

    def token(self) -> str | None:
        """Return the bearer token from --token-file or the environment; raise typer.BadParameter for a bad one."""
        from loftey.security import read_token_file, token_problem

        if self.token_file is not None:
            try:
                return read_token_file(self.token_file)[0]
            except (ValueError, OSError) as error:
                raise typer.BadParameter(str(error), param_hint="--token-file") from error
        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
        problem = token_problem(token)
        if problem is not None:
            raise typer.BadParameter(f"the token in {TOKEN_ENV} {problem}")
        return token

    def describe_failure(self, error) -> str:
        """Return the error line for a failed call, with a hint when the TLS settings do not fit the server."""
        line = f"error: {error.code.name}: {error.message}"
        if error.code.name != "UNAVAILABLE":
            return line
        if not self.uses_tls() and "Socket closed" in error.message:
            line += " (if the server uses TLS, pass --tls-ca FILE, or --tls for a publicly signed certificate)"
        elif "CERTIFICATE_VERIFY_FAILED" in error.message:
            line += (" (the server's certificate is not signed by a CA this client trusts, or does not name "
                     f"the host in {self.server}; pass --tls-ca with the CA that signed it)")
        return line


def _is_local(server: str) -> bool:
    """Return whether host:port names this machine's loopback interface."""
    host = server.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def stream_to_terminal(chunks: Iterable[Any], out: TextIO) -> Any:
    """Write each chunk's text as it arrives; return the last chunk (with finish_reason and usage)."""
    last = None
    for chunk in chunks:
        out.write(chunk.text)
        out.flush()
        last = chunk
    out.write("\n")
    out.flush()
    return last


def generate_remote(connection: Connection, prompt: str, chat: bool, **options: Any) -> None:
    """Stream a completion of prompt (a user message when chat is set) from a running server.

    Exits with code 1 and the server's status on stderr when the call fails.
    """
    from loftey.client import LofteyError

    with connection.open() as client:
        try:
            if chat:
                chunks = client.stream(messages=[{"role": "user", "content": prompt}], **options)
            else:
                chunks = client.stream(prompt, **options)
            stream_to_terminal(chunks, sys.stdout)
        except LofteyError as error:
            typer.echo(connection.describe_failure(error), err=True)
            raise typer.Exit(code=1) from error


def chat_command(
    message: Annotated[
        str | None, typer.Argument(help="Message to send. Without one, start an interactive chat.")
    ] = None,
    server: Annotated[str, typer.Option(help="host:port of a running Loftey server.")] = DEFAULT_SERVER,
    system: Annotated[str | None, typer.Option(help="System message to start the conversation with.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Maximum number of tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=100.0, help="Sampling temperature; 0 means greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens; 0 disables.")] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass; 1 disables.")] = 0.95,
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for sampling; unset gives a different reply each run.")] = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Chat with a running server: one reply to MESSAGE, or an interactive session without it."""
    from loftey.client import LofteyError

    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
               "seed": seed}
    history: list[dict[str, str]] = [] if system is None else [{"role": "system", "content": system}]
    opening = list(history)

    connection = Connection(server, token_file, tls, tls_ca, tls_cert, tls_key)
    with connection.open() as client:
        if message is not None:
            try:
                stream_to_terminal(client.stream(messages=[*history, {"role": "user", "content": message}],
                                                 **options), sys.stdout)
            except LofteyError as error:
                typer.echo(connection.describe_failure(error), err=True)
                raise typer.Exit(code=1) from error
            return

        typer.echo(f"Chatting with {server}. {RESET_COMMAND} starts over; {EXIT_COMMANDS[0]} or Ctrl-D ends.",
                   err=True)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                typer.echo("", err=True)
                return
            text = line.strip()
            if text in EXIT_COMMANDS:
                return
            if text == RESET_COMMAND:
                history = list(opening)
                continue
            if not text:
                continue
            history.append({"role": "user", "content": text})
            sys.stdout.write("loftey> ")
            reply = []
            try:
                for chunk in client.stream(messages=history, **options):
                    reply.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            except LofteyError as error:
                sys.stdout.write("\n")
                typer.echo(connection.describe_failure(error), err=True)
                history.pop()
                continue
            history.append({"role": "assistant", "content": "".join(reply)})
