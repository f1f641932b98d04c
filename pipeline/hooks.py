"""Forward pre-hooks on stock `transformers` modules: capture units, or rescale them (masks).

Capture points (SPEC §2): a head is a slice of the input of the attention output projection,
a neuron is a channel of the input of the FFN down projection, and each layer's input hidden
state is the first argument of the decoder layer. Some models (OPT) feed the down projection a
flattened [B·T, F] tensor; `_bt` views every captured tensor as [B, T, ...] using the batch size
read off the model call. `observe_masks` lets a meter see every unit mask `UnitMasker` (or another
masking hook, through `notify`) applies: the byte sparsity of `pipeline.evaluate.thresholds`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.adapters import Layout


class _HookSet(AbstractContextManager):
    """Owns hook handles; removes them on exit (also on error)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self.batch_size: int | None = None
        self._handles.append(model.register_forward_pre_hook(self._read_batch, with_kwargs=True))

    def _read_batch(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is not None:
            self.batch_size = int(ids.shape[0])

    def _bt(self, x: Tensor) -> Tensor:
        """View x as [B, T, features]."""
        if x.dim() == 3:
            return x
        if self.batch_size is None:
            raise RuntimeError("hooks saw a flattened tensor before the model call set the batch size")
        return x.view(self.batch_size, -1, x.shape[-1])

    def add(self, module: nn.Module, hook: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc) -> None:
        self.remove()


class UnitCapture(_HookSet):
    """Records, for the current forward pass, per layer, the tensors the projections receive:

    - `raw_heads[l]`: input of the attention output projection (graph-attached; [B, T, H·D]),
    - `raw_neurons[l]`: input of the FFN down projection (graph-attached; [B, T, F] or [B·T, F]),
    - `layer_inputs[l]`: [B, T, E] the layer's input hidden state (detached; only if asked).

    Differentiate with respect to the *raw* tensors (`torch.autograd.grad(loss, capture.raw())`);
    `heads(x)` / `neurons(x)` view a raw tensor, or its gradient, as [B, T, H, D] / [B, T, F].
    """

    def __init__(
        self, model: nn.Module, layout: Layout, *, layer_inputs: bool = False, layers: Iterable[int] | None = None
    ):
        super().__init__(model)
        self.layout = layout
        n = layout.n_layers
        self.raw_heads: list[Tensor | None] = [None] * n
        self.raw_neurons: list[Tensor | None] = [None] * n
        self.layer_inputs: list[Tensor | None] = [None] * n
        wanted = range(n) if layers is None else layers
        for l in wanted:
            self.add(layout.attn_out[l], self._store(self.raw_heads, l))
            self.add(layout.ffn_down[l], self._store(self.raw_neurons, l))
            if layer_inputs:
                self.add(layout.layers[l], self._input_hook(l), with_kwargs=True)

    @staticmethod
    def _store(slots: list, l: int):
        def hook(_m, args):
            slots[l] = args[0]

        return hook

    def _input_hook(self, l: int):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.layer_inputs[l] = h.detach()

        return hook

    def raw(self) -> list[Tensor]:
        """Heads of every layer, then neurons of every layer (the captured ones only)."""
        return [t for t in self.raw_heads + self.raw_neurons if t is not None]

    def heads(self, x: Tensor) -> Tensor:
        x = self._bt(x)
        return x.view(x.shape[0], x.shape[1], self.layout.n_heads, self.layout.head_dim)

    def neurons(self, x: Tensor) -> Tensor:
        return self._bt(x)


MaskObserver = Callable[..., None]
"""(pool, layer, keep [B, T, U] bool, *, site=None, cost=None) -> None: told which units a hook kept."""
_OBSERVERS: list[MaskObserver] = []


@contextmanager
def observe_masks(fn: MaskObserver) -> Iterator[None]:
    """Call `fn` for every unit mask a hook applies while the context is open (the byte meter of
    `pipeline.evaluate.thresholds` counts the weights a decode step would skip from these)."""
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


def notify(pool: str, layer: int, keep: Tensor, **kw: Any) -> None:
    """Report a keep mask [B, T, U] (True = unit kept) to the open observers."""
    for fn in _OBSERVERS:
        fn(pool, layer, keep, **kw)


HeadFn = Callable[[int, Tensor], Tensor | None]
"""(layer, heads [B, T, H, D]) -> multiplier broadcastable to [B, T, H], or None to leave dense."""
NeuronFn = Callable[[int, Tensor], Tensor | None]
"""(layer, neurons [B, T, F]) -> multiplier broadcastable to [B, T, F], or None to leave dense."""
LayerInputFn = Callable[[int, Tensor], None]
"""(layer, hidden [B, T, E]) -> None: observes each layer's input before the layer runs."""


class UnitMasker(_HookSet):
    """Zeroes (or rescales) heads and neurons by multiplying the projection inputs.

    `head_fn(l, x)` and `neuron_fn(l, x)` are asked per layer and forward pass; they see the
    unmasked activations so a contextual method can derive its masks from them (ShadowLLM reads
    layer 0's heads). `layer_input_fn(l, h)` sees each layer's input first (DejaVu predictors).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: Layout,
        *,
        head_fn: HeadFn | None = None,
        neuron_fn: NeuronFn | None = None,
        layer_input_fn: LayerInputFn | None = None,
    ):
        super().__init__(model)
        self.layout = layout
        for l in range(layout.n_layers):
            if layer_input_fn is not None:
                self.add(layout.layers[l], self._input_hook(l, layer_input_fn), with_kwargs=True)
            if head_fn is not None:
                self.add(layout.attn_out[l], self._head_hook(l, head_fn))
            if neuron_fn is not None:
                self.add(layout.ffn_down[l], self._neuron_hook(l, neuron_fn))

    def _input_hook(self, l: int, fn: LayerInputFn):
        def hook(_m, args, kwargs):
            fn(l, args[0] if args else kwargs["hidden_states"])

        return hook

    def _head_hook(self, l: int, fn: HeadFn):
        H, D = self.layout.n_heads, self.layout.head_dim

        def hook(_m, args):
            raw = args[0]
            x = self._bt(raw)
            x4 = x.view(x.shape[0], x.shape[1], H, D)
            m = fn(l, x4)
            if m is None:
                return None
            if _OBSERVERS:
                notify("heads", l, torch.broadcast_to(m.to(x4.device) != 0, x4.shape[:3]))
            out = (x4 * m.to(device=x4.device, dtype=x4.dtype).unsqueeze(-1)).view(raw.shape)
            return (out, *args[1:])

        return hook

    def _neuron_hook(self, l: int, fn: NeuronFn):
        def hook(_m, args):
            raw = args[0]
            x = self._bt(raw)
            m = fn(l, x)
            if m is None:
                return None
            if _OBSERVERS:
                notify("neurons", l, torch.broadcast_to(m.to(x.device) != 0, x.shape))
            out = (x * m.to(device=x.device, dtype=x.dtype)).view(raw.shape)
            return (out, *args[1:])

        return hook


def embeddings_require_grad(model: nn.Module) -> _HookSet:
    """Make the input embeddings a graph leaf that requires grad, so that activation gradients
    flow with every parameter frozen (no weight gradients are ever computed)."""
    hooks = _HookSet(model)
    emb = model.get_input_embeddings()

    def fwd_hook(_m, _args, out):
        return out.detach().requires_grad_(True)

    hooks._handles.append(emb.register_forward_hook(fwd_hook))
    return hooks
