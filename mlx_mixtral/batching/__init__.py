"""Many sequences at once: a batched KV cache, a continuous-batching scheduler, and the batch API."""
