"""The offloading runtime: host store, device slot cache, prefetcher, and the runtime the MoE block calls."""
