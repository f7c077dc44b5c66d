"""The forward-hook patterns the package repeats, each a context manager whose hooks are removed on leaving.

Calibration, healing, export measurements and perplexity all watch a model run rather than change it: they
see what a module receives or returns (:func:`captured_inputs`, :func:`captured_outputs`), end a pass as
soon as they have what it is for (:func:`stop_before`, :func:`stop_after`, :class:`StopForward`), or let
a module return a stored result instead of running (:func:`patched_forward`). A hook left behind by an
exception would keep running in every later pass of the caller's model, so every handle is removed in a
``finally``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any, TypeVar

from torch import nn

K = TypeVar("K")


class StopForward(Exception):
    """Raised from a hook to end a forward pass once it has produced what it is for: nothing after the hook
    runs (a decoder's head, as large as its embeddings, is never computed). Callers catch it around the call,
    e.g. ``with suppress(StopForward): model(x)``."""


@contextmanager
def captured_inputs(modules: Mapping[K, nn.Module], fn: Callable[..., Any], *, with_kwargs: bool = False
                    ) -> Iterator[None]:
    """Inside the ``with``, ``fn(key, args)`` (``fn(key, args, kwargs)`` with ``with_kwargs``) sees every call of
    each module in ``modules`` (``{key: module}``) before it runs. What ``fn`` returns is what a forward pre-hook
    returns (None: the call goes on unchanged); ``fn`` may raise :class:`StopForward` to end the pass."""
    with ExitStack() as stack:
        for key, mod in modules.items():
            if with_kwargs:
                hook = mod.register_forward_pre_hook(lambda _m, args, kwargs, k=key: fn(k, args, kwargs),
                                                     with_kwargs=True)
            else:
                hook = mod.register_forward_pre_hook(lambda _m, args, k=key: fn(k, args))
            stack.callback(hook.remove)
        yield


@contextmanager
def captured_outputs(modules: Mapping[K, nn.Module], fn: Callable[..., Any], *, with_kwargs: bool = False
                     ) -> Iterator[None]:
    """Inside the ``with``, ``fn(key, args, output)`` (``fn(key, args, kwargs, output)`` with ``with_kwargs``)
    sees every call of each module in ``modules`` (``{key: module}``) after it ran. A value ``fn`` returns
    replaces the module's output (as a forward hook's does); ``fn`` may raise :class:`StopForward`."""
    with ExitStack() as stack:
        for key, mod in modules.items():
            if with_kwargs:
                hook = mod.register_forward_hook(lambda _m, args, kwargs, out, k=key: fn(k, args, kwargs, out),
                                                 with_kwargs=True)
            else:
                hook = mod.register_forward_hook(lambda _m, args, out, k=key: fn(k, args, out))
            stack.callback(hook.remove)
        yield


def _stop(*_: Any) -> None:
    raise StopForward


@contextmanager
def stop_before(module: nn.Module) -> Iterator[None]:
    """Inside the ``with``, a call of ``module`` raises :class:`StopForward` before it runs. Hooks run in the
    order they were added: a :func:`captured_inputs` entered before this one still sees the call."""
    hook = module.register_forward_pre_hook(_stop)
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Inside the ``with``, a call of ``module`` raises :class:`StopForward` once it has run (after the
    :func:`captured_outputs` entered before this one have seen its output)."""
    hook = module.register_forward_hook(_stop)
    try:
        yield
    finally:
        hook.remove()


@contextmanager
def patched_forward(modules: Iterable[nn.Module], forward: Callable[..., Any]) -> Iterator[None]:
    """Inside the ``with``, a call of each of ``modules`` runs ``forward(module, *args, **kwargs)`` instead
    of the module's own forward (hooks still run): a stub that returns stored outputs, so the part of a model
    before a point is not computed again. An instance attribute shadows the class's ``forward``; on leaving,
    the module's own (an instance ``forward`` it already had included) is back."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for m in modules:
            patched.append((m, m.__dict__.get("forward")))
            m.forward = partial(forward, m)
        yield
    finally:
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own
