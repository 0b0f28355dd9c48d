"""Run the tokenizer service: python -m loftey.tokenizer --help."""

from loftey.tokenizer.server import main

main()
