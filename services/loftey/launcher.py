"""Run the whole stack on this machine: tokenizer, forward and orchestrator services.

``loftey serve`` starts each service as its own process; the forward service
starts a local Ray and its expert-group actors. It waits until every service
reports SERVING and prints the public address. Each service logs to its own
file, and Ctrl-C or SIGTERM stops them all. ``loftey demo`` does the same,
sends one streamed chat request, and stops.

Only the orchestrator binds the public host. The tokenizer and forward services
bind the internal host (loopback by default). When that host is not loopback,
or when asked, the launcher writes a private CA for this run, and the internal
services then serve TLS and accept only the orchestrator's client certificate.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from loftey.entrypoint import format_address

logger = logging.getLogger(__name__)

# How long one service may take to report SERVING. The forward service starts
# Ray and loads every expert group, which is the slowest step.
STARTUP_TIMEOUT_S = 300.0
# How long a service gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 20.0
PORT_FILE_POLL_S = 0.1

DEFAULT_PUBLIC_PORT = 50051
# Folder of the run directory that contains the private CA's files during start-up.
PKI_FOLDER = "pki"


@dataclass
class StackConfig:
    """Settings of a local stack. The fields mirror the services' own options."""

    model: str = "tiny"
    host: str = "127.0.0.1"
    # Public Generation port; 0 picks a free one.
    port: int = DEFAULT_PUBLIC_PORT
    metrics_port: int = 0
    # Address of the /metrics endpoint (no TLS, no token); None uses internal_host.
    metrics_host: str | None = None
    expert_groups: int = 2
    executor: str = "ray"
    dtype: str = "float32"
    max_batch_size: int = 32
    log_dir: Path | None = None
    # Address the tokenizer and forward services bind.
    internal_host: str = "127.0.0.1"
    # Mutual TLS between the services; None turns it on exactly when internal_host is not loopback.
    internal_tls: bool | None = None
    # TLS and bearer tokens of the public port, as the orchestrator's options of the same names.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_token_file: Path | None = None
    extra_forward_args: list[str] = field(default_factory=list)
    extra_orchestrator_args: list[str] = field(default_factory=list)

    def metrics_bind_host(self) -> str:
        return self.metrics_host if self.metrics_host is not None else self.internal_host

    def uses_internal_tls(self) -> bool:
        return self.internal_tls if self.internal_tls is not None else not is_loopback(self.internal_host)

    def public_security_args(self) -> list[str]:
        """Return the orchestrator options of the public port's TLS and tokens that are set."""
        options = {
            "--tls-cert": self.tls_cert,
            "--tls-key": self.tls_key,
            "--tls-client-ca": self.tls_client_ca,
            "--auth-token-file": self.auth_token_file,
        }
        return [item for option, value in options.items() if value is not None for item in (option, str(value))]


@dataclass
class ServiceProcess:
    """One started service: its process, log file and bound port."""

    name: str
    process: subprocess.Popen
    log_path: Path
    port: int
    # Port of the Prometheus /metrics endpoint (the orchestrator only); None when it has none.
    metrics_port: int | None = None


def resolve_model_dir(model: str) -> Path:
    """Return the checkpoint folder for a model name or path.

    "tiny" is the embedded default model, "dummy-235m" a random-weights model of
    the published shapes; anything else is a checkpoint folder. Raises
    FileNotFoundError for a folder without config.json.
    """
    if model == "tiny":
        from loftey.train.tiny import tiny_model_dir

        return tiny_model_dir()
    if model == "dummy-235m":
        from loftey.model.dummy import ensure_dummy_235m

        return with_default_tokenizer(ensure_dummy_235m())
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model {model!r} is not 'tiny', 'dummy-235m' or a checkpoint folder with config.json"
        )
    return path


def model_id(model: str) -> str:
    """Return the name a stack reports for its model: "tiny", "dummy-235m", or the checkpoint folder's name."""
    if model in ("tiny", "dummy-235m"):
        return model
    return Path(model).expanduser().resolve().name


def with_default_tokenizer(model_dir: Path) -> Path:
    """Copy the default Qwen tokenizer files into a checkpoint folder that has none."""
    if not (model_dir / "tokenizer.json").is_file():
        import shutil

        from loftey.tokenizer.qwen import default_tokenizer_dir

        for source in default_tokenizer_dir().iterdir():
            if source.is_file():
                shutil.copy2(source, model_dir / source.name)
    return model_dir


def is_loopback(host: str) -> bool:
    """Return whether host is a loopback address or localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect_host(host: str) -> str:
    """Return the address to reach a service bound to host from this machine: loopback for a wildcard bind."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host


def free_port(host: str) -> int:
    """Return a TCP port that is free on host now (another process may still take it before it is bound)."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def warn_about_exposure(config: StackConfig) -> None:
    """Log a warning for each setting that leaves a service or a secret open to the network."""
    if not is_loopback(config.internal_host) and not config.uses_internal_tls():
        logger.warning(
            "--internal-host %s with --no-internal-tls: anyone who reaches that address can call the tokenizer "
            "and forward services without credentials; drop --no-internal-tls", config.internal_host,
        )
    if not is_loopback(config.host) and config.tls_cert is None:
        if config.auth_token_file is not None:
            logger.warning(
                "--host %s with --auth-token-file but no TLS: bearer tokens cross the network in plaintext; "
                "add --tls-cert and --tls-key", config.host,
            )
        else:
            logger.warning(
                "--host %s without TLS or tokens: anyone who reaches that address can generate; "
                "add --tls-cert, --tls-key and --auth-token-file (see `loftey certs`)", config.host,
            )
    if not is_loopback(config.metrics_bind_host()):
        logger.warning(
            "/metrics on %s has no TLS or token: anyone who reaches it reads the server's load", config.metrics_bind_host(),
        )


def _internal_tls_args(config: StackConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """Write this run's private CA; return the options of the internal services and of the orchestrator."""
    if not config.uses_internal_tls():
        return [], []
    from loftey.pki import write_private_pki

    pki = write_private_pki(run_dir / PKI_FOLDER, hosts=[config.internal_host, socket.gethostname()])
    logger.info("internal channels use mutual TLS with a private CA for this run (%s)", pki.ca_cert)
    server_args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                   "--tls-client-ca", str(pki.ca_cert)]
    client_args = ["--backend-tls-ca", str(pki.ca_cert), "--backend-tls-cert", str(pki.client_cert),
                   "--backend-tls-key", str(pki.client_key)]
    return server_args, client_args


def _wait_for_port(service: str, process: subprocess.Popen, port_file: Path, log_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text().strip())
        if process.poll() is not None:
            raise RuntimeError(
                f"{service} service exited with code {process.returncode} before serving; see {log_path}"
            )
        time.sleep(PORT_FILE_POLL_S)
    raise TimeoutError(f"{service} service not serving after {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")


def _terminate_with_parent() -> None:
    """Ask Linux to send SIGTERM to this child process when its parent dies.

    Runs in the child between fork and exec, so a launcher killed without a
    chance to clean up (SIGKILL, or SIGTERM in a script without handlers)
    leaves no service behind.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_service(name: str, args: list[str], log_dir: Path, run_dir: Path) -> ServiceProcess:
    port_file = run_dir / f"{name}.port"
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", f"loftey.{name}", *args, "--port-file", str(port_file)]
    logger.info("starting %s: %s", name, " ".join(command))
    env = {
        "GRPC_VERBOSITY": "ERROR",  # keeps gRPC's INFO lines (each failed client handshake) out of the logs
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "RAY_worker_niceness": "0",
    }
    with open(log_path, "ab") as log_file:
        # A session of its own, so stopping the service also reaches the
        # processes it started (Ray's).
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
    port = _wait_for_port(name, process, port_file, log_path)
    logger.info("%s serving on port %d (log: %s)", name, port, log_path)
    return ServiceProcess(name=name, process=process, log_path=log_path, port=port)


def _stop(services: list[ServiceProcess]) -> None:
    for service in reversed(services):
        if service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in reversed(services):
        try:
            service.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit %.0f s after SIGTERM; killing it", service.name, STOP_TIMEOUT_S)
        # Whatever the service left in its session (Ray workers) goes too.
        try:
            os.killpg(service.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        service.process.wait()
        logger.info("%s stopped", service.name)


@contextmanager
def run_stack(config: StackConfig) -> Iterator[list[ServiceProcess]]:
    """Start the three services, yield them once all serve, and stop them on exit."""
    model_dir = resolve_model_dir(config.model)
    log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="loftey-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list[ServiceProcess] = []
    with tempfile.TemporaryDirectory(prefix="loftey-run-") as run_dir:
        try:
            internal_server_tls, backend_tls = _internal_tls_args(config, Path(run_dir))
            internal = ["--host", config.internal_host, "--port", "0", *internal_server_tls]
            tokenizer = _start_service("tokenizer", ["--model", str(model_dir), *internal], log_dir, Path(run_dir))
            services.append(tokenizer)
            forward = _start_service(
                "forward",
                [
                    "--model", str(model_dir), *internal,
                    "--model-id", model_id(config.model),
                    "--expert-groups", str(config.expert_groups),
                    "--executor", config.executor,
                    "--dtype", config.dtype,
                    *config.extra_forward_args,
                ],
                log_dir,
                Path(run_dir),
            )
            services.append(forward)
            backend_host = connect_host(config.internal_host)
            # A port picked here rather than by the orchestrator, so that it can be printed.
            metrics_port = free_port(config.metrics_bind_host()) if config.metrics_port == 0 else config.metrics_port
            orchestrator = _start_service(
                "orchestrator",
                [
                    "--tokenizer", format_address(backend_host, tokenizer.port),
                    "--forward", format_address(backend_host, forward.port),
                    *backend_tls,
                    "--host", config.host, "--port", str(config.port),
                    "--metrics-port", str(metrics_port),
                    "--metrics-host", config.metrics_bind_host(),
                    "--max-batch-size", str(config.max_batch_size),
                    *config.public_security_args(),
                    *config.extra_orchestrator_args,
                ],
                log_dir,
                Path(run_dir),
            )
            orchestrator.metrics_port = metrics_port if metrics_port >= 0 else None
            services.append(orchestrator)
            # Every service has loaded its certificate and key, so the private keys leave the disk.
            shutil.rmtree(Path(run_dir) / PKI_FOLDER, ignore_errors=True)
            yield services
        finally:
            _stop(services)


def serve(config: StackConfig) -> int:
    """Run the stack until Ctrl-C or SIGTERM; return the process exit code."""
    stop_requested = False
    serving = False

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        nonlocal stop_requested
        first = not stop_requested
        stop_requested = True
        if first and not serving:
            # Ends the start-up wait at once; run_stack then stops the services already started.
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        with run_stack(config) as services:
            serving = True
            return _serve_until_stopped(config, services, lambda: stop_requested)
    except KeyboardInterrupt:
        print("stopped before every service was serving", flush=True)
        return 0


def _serve_until_stopped(config: StackConfig, services: list[ServiceProcess], stop_requested) -> int:
    """Print the addresses, then watch the services until stop_requested() or one exits; return the exit code."""
    public = services[-1]
    scheme = "TLS" if config.tls_cert is not None else "plaintext"
    if config.auth_token_file is not None:
        scheme += ", bearer token required"
    print(f"Loftey is serving loftey.v1.Generation on {format_address(config.host, public.port)} ({scheme})",
          flush=True)
    if public.metrics_port is not None:
        metrics_address = format_address(connect_host(config.metrics_bind_host()), public.metrics_port)
        print(f"metrics: http://{metrics_address}/metrics", flush=True)
    print(f"logs: {public.log_path.parent}", flush=True)
    while not stop_requested():
        for service in services:
            if service.process.poll() is not None:
                logger.error("%s exited with code %d; stopping", service.name, service.process.returncode)
                return 1
        time.sleep(0.5)
    print("stopping…", flush=True)
    return 0


def demo(config: StackConfig, message: str) -> int:
    """Start the stack, stream one chat reply to stdout, and stop."""
    from loftey.client import LofteyClient

    with run_stack(config) as services:
        address = format_address(connect_host(config.host), services[-1].port)
        print(f"Loftey is serving on {address}")
        print(f"user> {message}")
        print("loftey> ", end="", flush=True)
        client = LofteyClient(address)
        for chunk in client.stream(messages=[{"role": "user", "content": message}], temperature=0.0, max_new_tokens=64):
            print(chunk.text, end="", flush=True)
        print()
        client.close()
    return 0
