"""The orchestrator: the public loftey.v1.Generation service with continuous batching.

Modules: ``validation`` (requests into valid types), ``scheduler`` (the task that
owns the batch, and the streamer), ``stop_strings``, ``service`` (the servicer),
``backends`` (tokenizer and forward clients), ``metrics``, ``app`` (the running
server and its lifecycle) and ``server`` (the command line).
"""
