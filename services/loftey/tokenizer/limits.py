"""Default limits of the tokenizer service, in a module light enough for the command line to import."""

# About 30,000 tokens of mixed English and Chinese, far beyond any Loftey
# context (512 tokens). Encoding one such text took about 33 ms on one core of
# a 2-core x86 machine (tokenizers 0.23).
DEFAULT_MAX_TEXT_CHARS = 100_000
DEFAULT_MAX_BATCH_SIZE = 1024
# Encode calls with at least this many characters in total (about 0.6 ms of
# encoding) run in a worker thread instead of on the event loop. Over several
# runs of benchmarks/tokenizer_service.py the hand-off added at most about
# 60 µs (6%) to a one-chat call, while a long text encoded on the loop delayed
# every other call, such as DetokenizeStep, by the whole encode (about 100 ms).
DEFAULT_THREAD_MIN_CHARS = 2_000
