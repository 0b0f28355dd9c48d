"""Print the gRPC health of Loftey services; exit 0 only when every one is SERVING.

Usage: python infra/check_health.py [--wait SECONDS] HOST:PORT [HOST:PORT ...]

Each service reports its overall health (service name "") through the standard
grpc.health.v1 protocol. With --wait, the check repeats until all services are
SERVING or the time runs out, which is how loftey-services.sh waits after a start.
Exit codes: 0 all SERVING, 1 any other status or an unreachable service.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# Seconds one health call may take.
CHECK_TIMEOUT_S = 5.0
# Seconds between rounds of checks while waiting.
WAIT_INTERVAL_S = 2.0


def check(address: str) -> str:
    """Return the service's health status name, or UNREACHABLE with the gRPC status code."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=CHECK_TIMEOUT_S)
        except grpc.RpcError as error:
            return f"UNREACHABLE ({error.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main() -> int:
    parser = argparse.ArgumentParser(description="Print the gRPC health of Loftey services.")
    parser.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="retry until all are SERVING")
    args = parser.parse_args()

    deadline = time.monotonic() + args.wait
    while True:
        statuses = {address: check(address) for address in args.addresses}
        serving = all(status == "SERVING" for status in statuses.values())
        if serving or time.monotonic() >= deadline:
            break
        time.sleep(WAIT_INTERVAL_S)
    for address, status in statuses.items():
        print(f"{address} {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
