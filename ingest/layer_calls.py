"""Decoder layers called again as the model called them: the recorded call, and hooks for a block.

Both the weights (the zero-input z, `ingest/weights.py`) and the fast engine (`ingest/engine.py`)
run layers on their own from a recorded call; this module is what they share.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Call:
    """One decoder layer's call as the model made it, less the hidden state."""

    args: tuple
    kwargs: dict
    hidden_kw: bool  # the hidden state came as `hidden_states=` rather than first positional
    tuple_out: bool = False  # the layer returned a tuple (hidden state first) rather than a tensor

    def run(self, layer, hidden: Tensor, batch: int, copies: int, tiled: dict | None = None) -> Tensor:
        """Call `layer` on `hidden` ([copies·batch, pos, d_model]), tiling batch-shaped arguments.

        `tiled` keeps each tiled tensor across the layers of one pass (they share the model's masks and
        rotary tables): each is copied once per pass, not once per layer.
        """
        tiled = {} if tiled is None else tiled
        args = _tile(self.args, batch, copies, tiled)
        kwargs = _tile(self.kwargs, batch, copies, tiled)
        out = layer(*args, hidden_states=hidden, **kwargs) if self.hidden_kw else layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _tile(obj, batch: int, copies: int, tiled: dict):
    """Repeat every batch-major tensor (masks, ALiBi [batch·head, …], per-row positions) `copies` times;
    `tiled` maps a tensor's id to its tiled copy (the caller keeps the tensors alive meanwhile)."""
    if copies == 1:
        return obj
    if isinstance(obj, Tensor):
        batchlike = obj.dim() >= 2 and obj.shape[0] % batch == 0 and not (obj.shape[0] == 1 and batch > 1)
        if not batchlike:
            return obj
        if id(obj) not in tiled:
            tiled[id(obj)] = torch.cat([obj] * copies)
        return tiled[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_tile(o, batch, copies, tiled) for o in obj)
    if isinstance(obj, list):
        return [_tile(o, batch, copies, tiled) for o in obj]
    if isinstance(obj, dict):
        return {k: _tile(v, batch, copies, tiled) for k, v in obj.items()}
    return obj


class Stop(Exception):
    """Raised by a hook to end a forward once everything it is run for has been captured."""


@contextlib.contextmanager
def hooks(*registrations):
    """Register every hook (each a no-argument callable returning a handle) for the block's duration."""
    handles = [r() for r in registrations]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_calls(model, layers, rows: Tensor, extra=()) -> tuple[list[Call], list[Tensor], object]:
    """Run the whole `model` once, recording each of its decoder `layers`' input and call (with any
    `extra` hook registrations). Returns (calls, inputs, output)."""
    calls: list[Call | None] = [None] * len(layers)
    inputs: list[Tensor | None] = [None] * len(layers)

    def pre(i):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            for cache_key in ("past_key_values", "past_key_value", "layer_past"):
                if cache_key in kwargs:
                    kwargs[cache_key] = None
            if "hidden_states" in kwargs:
                inputs[i] = kwargs.pop("hidden_states")
                calls[i] = Call(tuple(args), kwargs, True)
            else:
                inputs[i] = args[0]
                calls[i] = Call(tuple(args[1:]), kwargs, False)
        return hook

    def post(i):
        def hook(module, args, out):
            calls[i].tuple_out = isinstance(out, (tuple, list))
        return hook

    regs = [lambda i=i, layer=layer: layer.register_forward_pre_hook(pre(i), with_kwargs=True)
            for i, layer in enumerate(layers)]
    regs += [lambda i=i, layer=layer: layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    with torch.no_grad(), hooks(*regs, *extra):
        out = model(rows, use_cache=False)
    return calls, inputs, out
