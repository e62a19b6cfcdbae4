"""Numerical helpers shared by the tests."""
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64; infinite when either side holds NaN or inf."""
    a64, b64 = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return float("inf")
    denom = b64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, name: str = "tensor") -> None:
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
