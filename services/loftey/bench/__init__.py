"""`loftey bench`: load generation and benchmarks of a Loftey server.

Modules, in the order a benchmark uses them:

- workload: the requests (chat prompts from a file, or synthetic token ids with
  given length distributions) and their output lengths.
- runner: the asyncio gRPC client that sends them at a fixed concurrency or at a
  request rate (Poisson, or gamma with a burstiness setting).
- metrics: request throughput, output tokens/s, TTFT, TPOT, ITL and end-to-end
  latency, defined as vLLM's `bench serve` defines them.
- server_stats: per-expert-group load and step timings scraped from the server.
- baseline: the same workload through transformers' generate() in static batches.
- sweep: one server per point, restarted for each.
- profile and pyspy: where a decode step spends its time.
- report and plots: JSON, markdown tables and PNG plots.
"""
