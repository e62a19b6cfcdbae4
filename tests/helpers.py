"""Numerical helpers shared by the tests."""
import importlib.util
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    """Import scripts/<name>.py as a module (once: later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def saved_storages(fn, *args, exclude=()):
    """``(fn(*args), {storage address: bytes})`` of every storage autograd saves for the backward in the call,
    the storages of the tensors in ``exclude`` (e.g. a module's parameters) left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64; infinite when either side holds NaN or inf."""
    a64, b64 = a.detach().double().to(b.device), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return float("inf")
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, name: str = "tensor") -> None:
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def attention_inputs(B, H, N, d, m, dtype, seed=0, device="cpu"):
    """q, k, v [B, H, N, d] and landmarks [B, H, m, d], drawn in float32 from ``seed``, cast to ``dtype`` on
    ``device``, each a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g) for _ in range(3))
    landmarks = torch.randn(B, H, m, d, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, landmarks)]


def input_grads(out, inputs, grad_out):
    """Gradients of ``out`` for each input given ``grad_out``; zeros for an input ``out`` does not use."""
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
