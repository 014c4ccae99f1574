"""The executor: it runs step plans on every rank (the model runner, the worker
processes, the tensor-parallel group, CUDA graphs, the platform), and knows nothing of
requests."""
