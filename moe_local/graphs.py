"""`StaticDecoder`: one-token decode steps whose resident work per layer (norms, attention with its cache
write, the router's logits, a shared expert, a dense layer's MLP: `Block.front`) has shapes that do not
depend on the position, so that on CUDA each layer's part is one CUDA graph replay instead of ~20-40
kernel launches issued from Python. The routed experts stay eager between the replays: which ones run,
and what is copied, is decided on the host after each layer's routing sync.

The position lives on the device (`pos`), the cache is attended whole under a mask (a little more reading
than the prefix, much less host work), and each layer reads its input from one static buffer. On the CPU
the same code runs without capture, which is how the tests check it against the ordinary decode."""

from __future__ import annotations

import torch

from moe_local.model import KVCache, MoE, Transformer


class StaticDecoder:
    def __init__(self, model: Transformer, kv: KVCache, capture: bool):
        self.model, self.kv, self.capture = model, kv, capture
        weight = model.norm.weight  # the compute dtype, on the device
        self.pos = torch.zeros(1, dtype=torch.long, device=weight.device)
        self.x = torch.zeros(1, model.cfg.dim, dtype=weight.dtype, device=weight.device)  # each layer's input
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.outputs: list[tuple] = []

    def front(self, i: int) -> tuple:
        """Layer i's `Block.front` on the static input, at the static position."""
        cos, sin = self.model.rope_tables(self.pos, self.x.dtype)[self.model.rope_of[i]]
        return self.model.layers[i].front(self.x, cos, sin, self.kv.layers[i], self.pos)

    def _capture(self) -> None:
        """One graph per layer, sharing one memory pool; each is run once first on a side stream, as CUDA
        graph capture requires (that run writes a key and value at the current position, which the step
        writes again, and advances a recurrent state, which is put back)."""
        # a recurrent state (linear attention) would take the warm-up's step as well as the real one: keep it
        states = {t: t.clone() for layer in self.kv.layers for t in layer} if not self.kv.can_truncate else {}
        stream = torch.cuda.Stream(self.x.device)
        stream.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(stream):
            for i in range(len(self.model.layers)):
                self.front(i)
        torch.cuda.current_stream(self.x.device).wait_stream(stream)
        for t, saved in states.items():
            t.copy_(saved)
        self.graphs, pool = [], None
        for i in range(len(self.model.layers)):
            graph = torch.cuda.CUDAGraph()
            # thread_local: the CPU channel's worker may run meanwhile (it makes no CUDA calls of its own)
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs.append(self.front(i))
            pool = graph.pool()
            self.graphs.append(graph)

    def step(self, token: int, pos: int, experts) -> torch.Tensor:
        """Feed `token` at position `pos` of `kv` -> the final hidden state [1, D] (before lm_head)."""
        self.pos.fill_(pos)
        x = self.model.embed(torch.tensor([token]))  # [1, D]
        if self.capture and self.graphs is None:
            self.x.copy_(x)
            self._capture()
        for i, layer in enumerate(self.model.layers):
            self.x.copy_(x)
            if self.graphs is not None:
                self.graphs[i].replay()
                out = self.outputs[i]
            else:
                out = self.front(i)
            if isinstance(layer.ffn, MoE):
                x = layer.finish(*out, experts)
            else:
                (x,) = out
        return self.model.norm(x)
