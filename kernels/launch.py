"""Kernel launches through the launcher of the kernel Triton compiled: host time.

Triton's own launch path, ``kernel[grid](*args, **meta)``, binds and specializes every argument on every call:
~50 us of host time a launch, against ~13 us for the launcher of the compiled kernel (H200 host, the fused
short-sequence kernels). Where the GPU work is small (ViT lengths; the general path up to N ~ 16K, ~20 Triton
launches a forward+backward) the host sets the pace, so the kernels launch through :func:`launch`: the first
call of a signature goes through Triton (compiling if needed), later ones straight to the launcher Triton
chose for it, with every argument in the kernel's order.

A signature is what Triton specializes a compiled kernel on: each tensor's dtype, device and 16-byte alignment,
each int's value (Triton specializes ints equal to 1 or divisible by 16, and types them by range), the
compile-time ``meta`` and the grid (the launcher is bound to it). Floats are passed as they are. Under
``TRITON_INTERPRET=1`` every call goes through Triton (the interpreter has no compiled launcher).
"""
from __future__ import annotations

import inspect

import torch

_RUNNERS: dict = {}
# distinct signatures kept; past it the cache starts again (shapes that keep changing) rather than grow
CACHE_LIMIT = 1024


_Tensor = torch.Tensor
_int = int


def _signature(args) -> tuple:
    # one comprehension, ints (most arguments) tested first by exact type: ~4 us for 44 arguments against ~7 us
    # for a loop of isinstance tests (bools are not ints here: type(True) is bool)
    return tuple([a if type(a) is _int else (
        (a.dtype, a.get_device(), not a.data_ptr() & 15) if isinstance(a, _Tensor)
        else float if type(a) is float else ("bool", a) if type(a) is bool else a) for a in args])


# positions of the tensor arguments of a keyed launch, by (kernel id, key, argument count): a key fixes how the
# call site builds its arguments, so only those positions need looking at (half the host time of testing every
# argument)
_POSITIONS: dict = {}


def _keyed_tensors(kid, key, args) -> tuple:
    where = (kid, key, len(args))
    pos = _POSITIONS.get(where)
    if pos is None:
        if len(_POSITIONS) >= CACHE_LIMIT:
            _POSITIONS.clear()
        pos = _POSITIONS[where] = tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))
    return tuple([(args[i].dtype, not args[i].data_ptr() & 15) for i in pos])


def _default(kernel, name: str):
    """The default value of parameter ``name`` of a ``@triton.jit`` function (from its Python signature)."""
    return inspect.signature(kernel.fn).parameters[name].default


def launch(kernel, grid, args, meta: dict, key=None):
    """``kernel[grid](*args, **meta)``; returns the compiled kernel it ran. ``args``: the leading arguments in
    the kernel's order; ``meta``: every later parameter (constexprs without a default) and launch options
    (``num_warps``, ``num_stages``). ``key`` (hashable, optional), where the caller keeps per-shape plans: it
    must then fix the grid, ``meta``, the device and the value of every int argument, and only the tensors'
    dtypes and alignment are added to it (less host time than the full signature)."""
    grid = tuple(grid)
    # the kernel by identity (hashing a JITFunction goes through its cache_key: ~1 us a launch); the entry keeps
    # the kernel, so that an id reused by another object cannot match
    kid = id(kernel)
    sig = (kid, key, _keyed_tensors(kid, key, args)) if key is not None else (kid, grid, tuple(meta.items()),
                                                                               _signature(args))
    entry = _RUNNERS.get(sig)
    if entry is not None and entry[3] is kernel:
        compiled, runner, tail, _ = entry
        runner(*args, *tail)
        return compiled
    compiled = kernel[grid](*args, **meta)
    if hasattr(compiled, "run") and hasattr(compiled, "function"):  # not under TRITON_INTERPRET
        tail = [meta[n] if n in meta else _default(kernel, n) for n in kernel.arg_names[len(args):]]
        if len(_RUNNERS) >= CACHE_LIMIT:
            _RUNNERS.clear()
        _RUNNERS[sig] = (compiled, compiled[grid + (1,) * (3 - len(grid))], tail, kernel)
    return compiled


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` goes through Triton's constexpr machinery: ~1.7 us a
    call, dozens a forward+backward)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` itself for 0 and 1), as ``triton.next_power_of_2``, for host
    code."""
    return n if n <= 1 else 1 << (n - 1).bit_length()
