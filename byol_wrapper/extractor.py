"""Hidden-layer extraction: hook a layer of any backbone and pool its output to one vector per image.

The hook is a small callable object stored on the layer with a kept :class:`~torch.utils.hooks.RemovableHandle`.
It writes into a store keyed by thread and device (so ``nn.DataParallel`` replicas, which share hooks, and
concurrent forwards from several threads, e.g. a web service embedding with one learner, never read each
other's outputs: a forward hook runs in the thread of its forward) and the entry is cleared right after it is read, as timm's ``_features.py`` does. The hook is
removed when :meth:`HiddenLayerExtractor.remove_hook` is called or when the extractor is garbage collected, so
re-wrapping the same backbone never leaves stale hooks behind.

:func:`probe_representation` traces an extractor on a blank batch, on the ``meta`` device: the learner sizes its
projector from it, and finds the backbone parameters the loss cannot reach (which DDP must ignore).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Literal, NamedTuple, Union

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "HiddenLayerExtractor",
    "LayerSpec",
    "OutputKey",
    "RepresentationProbe",
    "pool_features",
    "preserved_state",
    "probe_representation",
    "resolve_layer",
    "select_output",
]

LayerSpec = Union[str, int]
TokenPool = Literal["cls", "mean", "flatten"]


def _layer_names(net: nn.Module) -> list[str]:
    return [name for name, _ in net.named_modules() if name]


def resolve_layer(net: nn.Module, layer: LayerSpec) -> nn.Module | None:
    """Finds the module that ``layer`` names in ``net``.

    Args:
        net: The backbone.
        layer: A module name as listed by ``net.named_modules()`` (any depth, e.g. ``"layer4.1.conv2"``),
            an integer index into the top-level children (negative counts from the end, as in
            byol-pytorch), or ``-1`` for the network's output.

    Returns:
        The module to hook, or ``None`` when ``layer == -1`` (use the network's output).

    Raises:
        TypeError: ``layer`` is neither ``str`` nor ``int``.
        ValueError: no such module; the message lists the closest real names.
    """
    if isinstance(layer, bool) or not isinstance(layer, (str, int)):
        raise TypeError(
            f"hidden_layer must be a module name (str), an index into the top-level children (int) "
            f"or -1 for the output, got {type(layer).__name__}: {layer!r}"
        )
    if isinstance(layer, int):
        if layer == -1:
            return None
        children = list(net.named_children())
        if not -len(children) <= layer < len(children):
            names = ", ".join(f"{i}: {n!r}" for i, (n, _) in enumerate(children))
            raise ValueError(
                f"hidden_layer={layer} is out of range: {type(net).__name__} has {len(children)} top-level "
                f"children ({names}); pass an index in [{-len(children)}, {len(children) - 1}], a module name, "
                f"or -1 for the output"
            )
        return children[layer][1]
    modules = dict(net.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    names = _layer_names(net)
    close = difflib.get_close_matches(layer, names, n=8, cutoff=0.3)
    suggestion = close if close else names[:8]
    raise ValueError(
        f"hidden_layer={layer!r} is not a module of {type(net).__name__}. "
        f"Closest names: {', '.join(repr(n) for n in suggestion)}"
        f"{' (of ' + str(len(names)) + ' in net.named_modules())' if len(names) > len(suggestion) else ''}. "
        f"Pass one of them, an int index into the top-level children, or -1 for the network's output."
    )


OutputKey = Union[str, int, None]


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _output_items(output: object) -> list[tuple[object, object]] | None:
    """``(key, value)`` pairs of a mapping (``ModelOutput``, dict) or namedtuple output; ``None`` otherwise."""
    if isinstance(output, Mapping):
        return list(output.items())
    if _is_namedtuple(output):
        return list(zip(output._fields, output))
    return None


def _first_tensor(output: object) -> torch.Tensor | None:
    """The first tensor in a layer output (a tensor, a mapping's values, or a tuple/list's elements)."""
    if isinstance(output, torch.Tensor):
        return output
    items = _output_items(output)
    values = [v for _, v in items] if items is not None else output if isinstance(output, (tuple, list)) else []
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


def _describe_keys(items: list[tuple[object, object]]) -> str:
    return ", ".join(
        f"{k!r} ({'tensor ' + str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__})" for k, v in items
    )


def select_output(output: object, output_key: OutputKey = None) -> object:
    """Picks the representation out of a layer output that is not a plain tensor.

    Rule: a tensor is returned as is. For a ``transformers`` ``ModelOutput``, a dict or another mapping, or a
    namedtuple: the entry ``output_key`` when given; else ``pooler_output`` when present (the model's own pooled
    summary: ViT's tanh-projected CLS token, DINOv2's normalised CLS token, ResNetModel's pooled map); else
    ``last_hidden_state`` (pooled afterwards by :func:`pool_features`: tokens by ``token_pool``, maps by a
    global average); else the first tensor entry. A plain tuple or list: element ``output_key`` (an int) when
    given, else its first element.

    Args:
        output: The layer (or model) output.
        output_key: Name of the entry to use (mapping or namedtuple), or an index (tuple, list, namedtuple).

    Returns:
        The selected entry (pooled later by :func:`pool_features`).

    Raises:
        ValueError: ``output_key`` is not an entry of ``output``; the message lists the entries.
        RuntimeError: ``output`` holds no tensor; the message lists its entries.
    """
    if isinstance(output, torch.Tensor):
        return output
    items = _output_items(output)
    if items is not None:
        keys = [k for k, _ in items]
        if output_key is not None:
            if isinstance(output_key, int) and not isinstance(output_key, bool) and _is_namedtuple(output):
                if -len(items) <= output_key < len(items):
                    return items[output_key][1]
            elif output_key in keys:
                return dict(items)[output_key]
            raise ValueError(
                f"output_key={output_key!r} is not an entry of the {type(output).__name__} the hooked layer returned; "
                f"its entries are: {_describe_keys(items) or 'none'}. Pass one of them as output_key"
            )
        entries = dict(items)
        for key in ("pooler_output", "last_hidden_state"):
            if isinstance(entries.get(key), torch.Tensor):
                return entries[key]
        tensor = _first_tensor(output)
        if tensor is None:
            raise RuntimeError(
                f"the hooked layer returned a {type(output).__name__} with no tensor entry (entries: "
                f"{_describe_keys(items) or 'none'}); hook another layer or pass output_key"
            )
        return tensor
    if isinstance(output, (tuple, list)) and output_key is not None:
        if isinstance(output_key, int) and not isinstance(output_key, bool) and -len(output) <= output_key < len(output):
            return output[output_key]
        raise ValueError(
            f"output_key={output_key!r} does not index the {type(output).__name__} of {len(output)} elements the hooked "
            f"layer returned ({', '.join(type(v).__name__ for v in output)}); pass an int in [{-len(output)}, {len(output) - 1}]"
        )
    return output


def pool_features(
    features: torch.Tensor | tuple | list | Mapping, token_pool: TokenPool = "cls", output_key: OutputKey = None
) -> torch.Tensor:
    """Reduces a layer's output to one vector per image.

    Rule: a ``ModelOutput``, mapping, namedtuple or tuple is first reduced to one entry by
    :func:`select_output` (``output_key`` if given, else ``pooler_output``, else ``last_hidden_state``, else
    the first tensor). Then 2-D ``(B, D)`` is kept; 3-D ``(B, T, D)`` is treated as a token sequence and reduced by
    ``token_pool`` (``"cls"``: the first token, as in ViT; ``"mean"``: the mean over tokens); 4-D and higher
    ``(B, C, H, W, ...)`` feature maps are global-average-pooled over the spatial dimensions. A tuple or
    list output (e.g. from attention layers) uses its first element. ``token_pool="flatten"`` instead flattens
    every output to ``(B, -1)``, 4-D maps included, as byol-pytorch does.

    Args:
        features: The layer output.
        token_pool: Pooling for 3-D outputs, or ``"flatten"`` for all.
        output_key: Entry of a structured output to use; see :func:`select_output`.

    Returns:
        A ``(B, D)`` tensor.
    """
    features = select_output(features, output_key)
    if isinstance(features, (tuple, list)):
        if not features:
            raise RuntimeError("the hooked layer returned an empty tuple/list; hook another layer")
        features = features[0]
    if not isinstance(features, torch.Tensor):
        raise RuntimeError(
            f"the hooked layer returned {type(features).__name__}, not a tensor; hook another layer"
        )
    if features.ndim == 2:
        return features
    if token_pool == "flatten" and features.ndim >= 1:
        return features.reshape(features.shape[0], -1)
    if features.ndim == 3:
        return features[:, 0] if token_pool == "cls" else features.mean(dim=1)
    if features.ndim >= 4:
        return features.mean(dim=tuple(range(2, features.ndim)))
    raise RuntimeError(
        f"the hooked layer returned a {features.ndim}-D tensor of shape {tuple(features.shape)}; "
        f"expected (B, D), (B, T, D) or (B, C, H, W): hook another layer"
    )


@contextlib.contextmanager
def preserved_state(net: nn.Module) -> Iterator[nn.Module]:
    """Runs a block with ``net`` in eval mode, then restores every module's training flag and every buffer.

    Used for the real forward passes the library makes on a user's backbone outside training (feature extraction
    for evaluation; :func:`probe_representation` when the ``meta`` device is not supported), so that no BatchNorm
    statistic, ``num_batches_tracked`` or flag changes.
    """
    flags = {m: m.training for m in net.modules()}
    saved = {name: b.detach().clone() for name, b in net.named_buffers()}
    try:
        net.eval()
        yield net
    finally:
        for m, flag in flags.items():
            m.training = flag
        with torch.no_grad():
            for name, b in net.named_buffers():
                if name in saved:
                    b.copy_(saved[name])


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def _store_key(device: torch.device) -> tuple[int, torch.device]:
    """The store entry of this thread's forward on ``device`` (a hook runs in the thread of its forward).

    Under ``torch.compile`` the thread (which dynamo cannot trace) is left out: a hook traced with its reader is a
    value of the graph, not shared state. A compiled backbone called from an eager learner (``net.compile()``)
    writes that thread-less entry for the eager reader, which then also looks there (such a backbone is not
    thread-safe here).
    """
    return (0 if _is_compiling() else threading.get_ident()), device


class _FeatureHook:
    """Forward hook writing a layer's output into a store keyed by (thread, device)."""

    def __init__(self) -> None:
        self.store: dict[tuple[int, torch.device], object] = {}

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        tensor = _first_tensor(output)  # tensor, tuple, ModelOutput, dict or namedtuple
        device = tensor.device if isinstance(tensor, torch.Tensor) else torch.device("cpu")
        self.store[_store_key(device)] = output


class HiddenLayerExtractor(nn.Module):
    """Runs a backbone and returns the pooled output of one of its layers.

    Args:
        net: The backbone; it is used as is (no layer is replaced, no forward is run here).
        layer: Which layer to read; see :func:`resolve_layer`.
        token_pool: ``"cls"`` or ``"mean"``, pooling for 3-D token outputs; see :func:`pool_features`.
        output_key: Entry of a structured layer output (``ModelOutput``, dict, namedtuple, tuple) to use;
            ``None`` applies the rule of :func:`select_output`.
    """

    def __init__(self, net: nn.Module, layer: LayerSpec = -2, token_pool: TokenPool = "cls", output_key: OutputKey = None) -> None:
        super().__init__()
        if token_pool not in ("cls", "mean", "flatten"):
            raise ValueError(f"token_pool must be 'cls', 'mean' or 'flatten' (byol-pytorch's), got {token_pool!r}")
        if output_key is not None and (isinstance(output_key, bool) or not isinstance(output_key, (str, int))):
            raise TypeError(f"output_key must be an entry name (str), an index (int) or None, got {output_key!r}")
        self.output_key = output_key
        self.net = net
        self.layer = layer
        self.token_pool = token_pool
        self._hook: _FeatureHook | None = None
        self._handle = None
        self._finalizer = None
        self._register_hook()

    def _register_hook(self) -> None:
        module = resolve_layer(self.net, self.layer)
        if module is None:
            return
        self._hook = _FeatureHook()
        self._handle = module.register_forward_hook(self._hook)
        # Remove the hook from the user's layer when this extractor is garbage collected.
        self._finalizer = weakref.finalize(self, self._handle.remove)

    def remove_hook(self) -> None:
        """Removes the forward hook from the backbone. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # calls handle.remove() once
            self._finalizer = None
        self._handle = None
        self._hook = None

    def rebind_hook(self) -> None:
        """Drops every hook this class left on ``net`` and registers a fresh one (used after ``deepcopy``)."""
        for module in self.net.modules():
            for key, hook in list(module._forward_hooks.items()):
                if isinstance(hook, _FeatureHook):
                    del module._forward_hooks[key]
        self._hook = None
        self._handle = None
        self._finalizer = None
        self._register_hook()

    @property
    def has_hook(self) -> bool:
        """Whether a hook is registered (``False`` for ``layer=-1``)."""
        return self._hook is not None

    def __deepcopy__(self, memo: dict) -> "HiddenLayerExtractor":
        # Copy modules normally, then give the copy its own hook on its own layer.
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("_hook", "_handle", "_finalizer"):
                continue
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        new.rebind_hook()
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_hook"] = state["_handle"] = state["_finalizer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if resolve_layer(self.net, self.layer) is not None:
            self.rebind_hook()

    def get_representation(self, x: torch.Tensor, run: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
        """Returns the pooled ``(B, D)`` features of the chosen layer for the batch ``x``.

        Args:
            x: Input batch.
            run: Calls the backbone on ``x``; defaults to ``self.net`` (the probe passes a meta-device call).
        """
        run = self.net if run is None else run
        if self.layer == -1:
            return pool_features(run(x), self.token_pool, getattr(self, "output_key", None))
        hook = self._hook
        if hook is None:
            raise RuntimeError("the hidden-layer hook was removed (remove_hook() was called); re-create the BYOL learner")
        # Only this thread's entry for this device is touched: nn.DataParallel replicas and concurrent callers share
        # the hook across threads. (A dict's single-key set and pop are atomic under the GIL.)
        key = _store_key(x.device)
        untraced = (0, x.device)  # written by a compiled backbone's hook (see _store_key)
        hook.store.pop(key, None)
        hook.store.pop(untraced, None)
        run(x)
        output = hook.store.pop(key, None)
        if output is None:
            output = hook.store.pop(untraced, None)
        if output is None:
            raise RuntimeError(
                f"hidden_layer={self.layer!r} never ran during the forward of {type(self.net).__name__}: "
                f"the module exists but is not called by net.forward. Hook a layer that runs, or use -1 for the output."
            )
        return pool_features(output, self.token_pool, getattr(self, "output_key", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`get_representation`."""
        return self.get_representation(x)


class RepresentationProbe(NamedTuple):
    """What :func:`probe_representation` found out about an extractor's backbone."""

    dim: int
    """Size ``D`` of the pooled ``(B, D)`` representation."""
    unreachable: tuple[str, ...]
    """Names (in ``extractor.net.named_parameters()``) of the trainable parameters that get no gradient from the
    representation: layers that run after the hooked one and modules that never run. Empty unless probed with
    ``gradients=True``."""


def probe_representation(
    extractor: HiddenLayerExtractor,
    input_shape: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    gradients: bool = False,
) -> RepresentationProbe:
    """Traces an extractor on a blank batch: the size of its representation and which parameters it reaches.

    The trace runs two zero images of shape ``input_shape`` on the ``meta`` device, through
    ``torch.func.functional_call`` with meta copies of the backbone's parameters and buffers: no memory, no
    compute, and nothing of the backbone changes (no buffer, training flag or ``.grad``). A backbone with a layer
    that the ``meta`` device cannot run (one that reads a tensor's value, say) gets one real pass instead, on its
    own device, in eval mode inside :func:`preserved_state` (buffers and flags restored); the gradients are
    taken with ``torch.autograd.grad``, so no ``.grad`` is written either way.

    Args:
        extractor: The extractor (a :class:`~byol_wrapper.NetWrapper` too); its ``net`` is traced.
        input_shape: ``(C, H, W)`` of one image.
        dtype: Input dtype; defaults to that of the backbone's first floating-point parameter (else float32).
        gradients: Also find the trainable parameters the representation cannot reach (one backward pass).

    Returns:
        The representation size and, with ``gradients``, the unreachable parameter names.

    Raises:
        Exception: Whatever the real pass raises when the ``meta`` trace fails too (e.g. a backbone that does not
            take ``input_shape``); callers decide whether that is an error.
    """
    net = extractor.net
    if dtype is None:
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), torch.float32)
    shape = (2, *input_shape)
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad] if gradients else []
    try:
        state = {name: torch.empty_like(t, device="meta") for name, t in [*net.named_parameters(), *net.named_buffers()]}
        leaves = [state[name].requires_grad_() for name, _ in trainable]
        x = torch.zeros(shape, dtype=dtype, device="meta")
        return _trace(extractor, lambda i: functional_call(net, state, (i,), tie_weights=True), x, trainable, leaves)
    except Exception:  # noqa: BLE001 - a layer without meta support: one guarded real pass
        pass
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    with preserved_state(net):
        x = torch.zeros(shape, dtype=dtype, device=device)
        return _trace(extractor, net, x, trainable, [p for _, p in trainable])


def _trace(
    extractor: HiddenLayerExtractor,
    run: Callable[[torch.Tensor], object],
    x: torch.Tensor,
    trainable: list[tuple[str, torch.Tensor]],
    leaves: list[torch.Tensor],
) -> RepresentationProbe:
    """One probe pass: the representation of ``x`` through ``run`` and, if ``leaves``, which get no gradient."""
    with torch.enable_grad() if leaves else torch.no_grad():
        rep = extractor.get_representation(x, run)
        grads = torch.autograd.grad(rep.sum(), leaves, allow_unused=True) if leaves else ()
    unreachable = tuple(name for (name, _), grad in zip(trainable, grads) if grad is None)
    return RepresentationProbe(int(rep.shape[-1]), unreachable)
