"""TLS credentials and bearer-token authentication for the gRPC services.

The public API checks the ``authorization: Bearer <token>`` metadata of every
call against the tokens of a token file: a call without one gets
UNAUTHENTICATED, a call with a token that matches none gets PERMISSION_DENIED.
Tokens are compared with :func:`hmac.compare_digest` (constant time) and are
never logged. Health checks stay open so that load balancers and the launcher
can probe a server without a token. The server reads the token file again when
it changes, so tokens can be added and removed without a restart.
"""

from __future__ import annotations

import hmac
import logging
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "
# Methods served without a token: the standard health service only.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
# A token shorter than this is rejected when the token file is read: it is too easy to guess.
MIN_TOKEN_CHARS = 16
# Characters a token may contain: printable ASCII without spaces, which gRPC metadata can carry.
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)
# Seconds between checks of whether the token file changed.
TOKEN_FILE_CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS server: its certificate chain and key, and optionally a CA for client certificates."""

    cert: Path
    key: Path
    # With a client CA, every client must present a certificate it signed (mutual TLS).
    client_ca: Path | None = None


@dataclass(frozen=True)
class ClientTlsFiles:
    """PEM files of a TLS client: the CA it trusts (None: the system's), and its own certificate and key for mutual TLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.ca, self.cert, self.key)


def server_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> TlsFiles | None:
    """Return the TLS files of a server's options, or None when it serves plaintext (no cert and no key).

    Raises ValueError when only one of cert and key is given, or client_ca without them.
    """
    if (cert is None) != (key is None):
        raise ValueError(f"tls_cert and tls_key must be given together, got tls_cert={cert}, tls_key={key}")
    if client_ca is not None and cert is None:
        raise ValueError("tls_client_ca needs tls_cert and tls_key, because mutual TLS is TLS first")
    return None if cert is None else TlsFiles(cert, key, client_ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Load a server's TLS credentials.

    Raises FileNotFoundError for a missing file, and ValueError for a file that
    is not readable PEM or a key that does not belong to the certificate, so
    that these fail with their reason instead of as a failed bind.
    """
    cert = _read_pem(files.cert, "TLS certificate")
    key = _read_pem(files.key, "TLS key")
    _check_key_matches(cert, key, files)
    if files.client_ca is None:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = _read_pem(files.client_ca, "TLS client CA")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """Load a client's TLS credentials: the CA to trust (None: the system's) and an optional client certificate."""
    if (cert is None) != (key is None):
        raise ValueError(f"a client certificate needs both cert and key, got cert={cert} and key={key}")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read_pem(ca, "TLS CA"),
        private_key=None if key is None else _read_pem(key, "TLS client key"),
        certificate_chain=None if cert is None else _read_pem(cert, "TLS client certificate"),
    )


def read_token_file(path: Path) -> tuple[str, ...]:
    """Read the accepted tokens, one a line; blank lines and lines starting with # are skipped.

    Several tokens let a deployment rotate them without downtime. Raises
    ValueError for a file with no token or a token under MIN_TOKEN_CHARS characters.
    """
    text = _read_file(path, "auth token").decode("utf-8", errors="replace")
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        # The messages give the line and length only: the token itself is a secret.
        problem = token_problem(token)
        if problem is not None:
            raise ValueError(f"auth token on line {number} of {path} {problem}")
        tokens.append(token)
    if not tokens:
        raise ValueError(f"auth token file {path} contains no token")
    return tuple(tokens)


def token_problem(token: str) -> str | None:
    """Return why token cannot be used (too short, or characters gRPC metadata cannot carry), or None."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"must be at least {MIN_TOKEN_CHARS} characters, got {len(token)}"
    if not set(token) <= TOKEN_CHARS:
        return "may contain only printable ASCII characters without spaces"
    return None


def token_matches(presented: str, accepted: Sequence[str]) -> bool:
    """Return whether the presented token equals one of the accepted tokens, comparing every one in constant time."""
    presented_bytes = presented.encode()
    matched = False
    for token in accepted:
        # No early exit, so the time taken does not tell which token matched.
        matched |= hmac.compare_digest(presented_bytes, token.encode())
    return matched


def check_authorization(metadata: Sequence[tuple[str, str | bytes]], accepted: Sequence[str]) -> tuple[
    grpc.StatusCode, str
] | None:
    """Return the status a call with this metadata gets, or None when its bearer token is accepted."""
    values = [value for key, value in metadata if key == AUTHORIZATION_KEY]
    if not values:
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"missing {AUTHORIZATION_KEY} metadata; send '{AUTHORIZATION_KEY}: {BEARER_PREFIX}<token>'"
        )
    value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
    if not value.startswith(BEARER_PREFIX):
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"{AUTHORIZATION_KEY} metadata must be '{BEARER_PREFIX}<token>'"
        )
    if not token_matches(value[len(BEARER_PREFIX):].strip(), accepted):
        return grpc.StatusCode.PERMISSION_DENIED, "bearer token is not valid for this server"
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without an accepted bearer token, except to the health service.

    With a token file, the accepted tokens follow the file. A call checks it for
    a change when TOKEN_FILE_CHECK_INTERVAL_S has passed since the last check.
    A file that became invalid keeps the previous tokens and logs a warning.
    """

    def __init__(self, tokens: Sequence[str], token_file: Path | None = None) -> None:
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = tuple(tokens)
        self._rejected = 0
        self._token_file = None if token_file is None else Path(token_file)
        self._file_version = None if token_file is None else _file_version(self._token_file)
        self._next_check = time.monotonic() + TOKEN_FILE_CHECK_INTERVAL_S

    @property
    def tokens(self) -> tuple[str, ...]:
        return self._tokens

    @classmethod
    def from_file(cls, token_file: Path) -> BearerTokenInterceptor:
        """Accept the tokens of token_file, and follow its changes."""
        return cls(read_token_file(token_file), token_file)

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self._token_file is None or now < self._next_check:
            return
        self._next_check = now + TOKEN_FILE_CHECK_INTERVAL_S
        version = _file_version(self._token_file)
        if version == self._file_version:
            return
        self._file_version = version
        try:
            tokens = read_token_file(self._token_file)
        except (OSError, ValueError) as error:
            logger.warning("keeping the previous %d tokens: the changed token file is invalid: %s",
                           len(self._tokens), error)
            return
        self._tokens = tokens
        logger.info("token file %s changed: %d tokens accepted", self._token_file, len(tokens))

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        self._reload_if_changed()
        failure = check_authorization(handler_call_details.invocation_metadata or (), self._tokens)
        if failure is None:
            return handler
        self._rejected += 1
        # Counted, and logged at the first and then every 100th, so a flood of bad calls stays quiet.
        if self._rejected == 1 or self._rejected % 100 == 0:
            logger.warning("rejected call to %s: %s (%d rejected so far)", method, failure[0].name, self._rejected)
        return _rejecting_handler(handler, *failure)


def _rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """Build a handler of the same kind as handler that ends the call with code and message."""

    async def reject_unary(request_or_iterator, context):
        await context.abort(code, message)

    async def reject_stream(request_or_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kinds: dict[tuple[bool, bool], Callable] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    build = kinds[(handler.request_streaming, handler.response_streaming)]
    return build(
        reject_stream if handler.response_streaming else reject_unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Return the call metadata that carries token, or none for no token."""
    if token is None:
        return ()
    return ((AUTHORIZATION_KEY, f"{BEARER_PREFIX}{token}"),)


def _check_key_matches(cert_pem: bytes, key_pem: bytes, files: TlsFiles) -> None:
    """Raise ValueError unless key_pem is an unencrypted private key of the first certificate in cert_pem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise ValueError(f"TLS certificate file {files.cert} contains no valid certificate: {error}") from error
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError as error:
        raise ValueError(f"TLS key file {files.key} is encrypted; pass an unencrypted key") from error
    except ValueError as error:
        raise ValueError(f"TLS key file {files.key} contains no valid private key: {error}") from error
    public_format = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public_format) != certificate.public_key().public_bytes(*public_format):
        raise ValueError(f"TLS key file {files.key} does not belong to the certificate in {files.cert}")


def _file_version(path: Path) -> bytes | None:
    """Return the file's contents, or None when it cannot be read.

    The contents, not the modification time, because two writes within the
    file system's timestamp granularity would look like one.
    """
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_file(path: Path, description: str) -> bytes:
    """Read a whole file; raise FileNotFoundError or ValueError naming description, path and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{description} file {path} not found")
    if not path.is_file():
        raise ValueError(f"{description} file {path} is not a regular file")
    try:
        return path.read_bytes()
    except OSError as error:
        raise ValueError(f"{description} file {path} cannot be read: {error.strerror or error}") from error


def _read_pem(path: Path, description: str) -> bytes:
    data = _read_file(path, description)
    if b"-----BEGIN " not in data:
        raise ValueError(f"{description} file {path} is not PEM (no '-----BEGIN' line)")
    return data
