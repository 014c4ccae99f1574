"""The engine core on rank 0: requests and their sequences, the scheduler over the paged
KV cache's blocks, sampling, detokenizing, and the engine loop that joins them."""
