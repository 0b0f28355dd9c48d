"""Default input limits of the tokenizer, in a module light enough for the command line to import."""

# About 30,000 tokens of mixed English and Chinese, far beyond any Loftey
# context (512 tokens). One such text takes about 33 ms to encode (one core of
# the 2-core development machine), during which the event loop waits.
DEFAULT_MAX_TEXT_CHARS = 100_000
DEFAULT_MAX_BATCH_SIZE = 1024
