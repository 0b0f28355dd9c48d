"""The model-forward service: dense layers, KV cache and sampling in one process, experts in expert groups.

Modules, from the bottom up:
- `partition`: which group runs which experts; `weights`: strict, by-name loading.
- `experts`: one group's SwiGLU experts; `executor`: the ExpertExecutor interface and
  the in-process executor.
- `ray_actor`, `ray_executor`, `shm_channel`, `shm_executor`, `compiled_executor`:
  expert groups as Ray actors, reached three ways.
- `kv_cache`, `dense`: the forward pass over a ragged batch; `sampling`; `engine`:
  per-sequence state and the step.
- `validation`, `service`: gRPC; `server`: start-up and `loftey serve forward`.

Nothing is imported here, so `import loftey.forward.server` stays cheap for the CLI.
"""
