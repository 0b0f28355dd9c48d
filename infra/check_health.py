"""Print the gRPC health of Loftey services; exit 0 only when every one is SERVING.

Usage: python infra/check_health.py [--wait SECONDS] [--tls-ca FILE] [--tls HOST:PORT ...] [HOST:PORT ...]

Each service reports its overall health (service name "") through the standard
grpc.health.v1 protocol. With --wait, the check repeats until all services are
SERVING or the time runs out, which is how loftey-services.sh waits after a start.
Addresses given with --tls are checked over TLS, trusting --tls-ca (the
system's CAs without it); the certificate must name the host given.
Exit codes: 0 all SERVING, 1 any other status or an unreachable service.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Seconds one health call may take.
CHECK_TIMEOUT_S = 5.0
# Seconds between rounds of checks while waiting.
WAIT_INTERVAL_S = 2.0


def open_channel(address: str, tls: bool, tls_ca: bytes | None) -> grpc.Channel:
    if tls:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))
    return grpc.insecure_channel(address)


def check(address: str, tls: bool = False, tls_ca: bytes | None = None) -> str:
    """Return the service's health status name, or UNREACHABLE with the gRPC status code."""
    with open_channel(address, tls, tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT_S)
        except grpc.RpcError as error:
            return f"UNREACHABLE ({error.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main() -> int:
    parser = argparse.ArgumentParser(description="Print the gRPC health of Loftey services.")
    parser.add_argument("addresses", nargs="*", metavar="HOST:PORT", help="services checked in plaintext")
    parser.add_argument("--tls", action="append", default=[], metavar="HOST:PORT", help="a service checked over TLS")
    parser.add_argument("--tls-ca", type=Path, metavar="FILE", help="PEM CA that signed the --tls services' certificates")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="retry until all are SERVING")
    args = parser.parse_args()
    if not args.addresses and not args.tls:
        parser.error("give at least one HOST:PORT")
    tls_ca = args.tls_ca.read_bytes() if args.tls_ca is not None else None
    targets = [(address, False) for address in args.addresses] + [(address, True) for address in args.tls]

    deadline = time.monotonic() + args.wait
    while True:
        statuses = {address: check(address, tls, tls_ca) for address, tls in targets}
        serving = all(status == "SERVING" for status in statuses.values())
        if serving or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_INTERVAL_S)
    for address, status in statuses.items():
        print(f"{address} {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
