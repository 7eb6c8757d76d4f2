"""Expert offloading: run a Mixtral whose experts do not fit in memory.

The non-expert weights stay resident; each MoE layer keeps a fixed number of expert slots (cache.py)
and reads a missing expert's bytes straight from the model's own safetensors files (store.py: in a
stacked `(E, out, in)` tensor one expert is one contiguous byte range; per-expert tensors are read
whole), while a background reader fetches the experts the next layer will probably want
(prefetch.py). switch.py is the MoE layer that drives it, load.py builds such a model, policy.py
holds the eviction policies, stats.py what it reports.
"""
