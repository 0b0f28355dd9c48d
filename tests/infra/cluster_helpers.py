"""Settings of the test cluster, shared by tests/infra's fixtures and tests (a uniquely named module)."""

EXPERT_RESOURCE = "expert_node"
# expert_node units each worker node offers: its own group plus one restarted from a lost node.
GROUPS_PER_WORKER = 2
# A resource only the head node offers, for tests that need actors on the driver's node.
HEAD_RESOURCE = "driver_node"
NUM_WORKERS = 2
# Node failure detection: a node that misses 3 health checks 0.5 s apart counts as dead
# (Ray 2.60 defaults to 5 checks 3 s apart).
FAST_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
}
