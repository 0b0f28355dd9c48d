"""Run the orchestrator service: python -m loftey.orchestrator --help."""

from loftey.orchestrator.server import main

main()
