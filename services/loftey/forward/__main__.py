"""Run the forward service: python -m loftey.forward --help."""

from loftey.forward.server import main

main()
