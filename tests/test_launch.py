"""kernels/launch.py: launches through the compiled kernel's launcher, keyed by what Triton specializes on."""
import torch

from mita.kernels import launch


class _Compiled:
    function = object()

    def __init__(self, calls):
        self.calls = calls

    def run(self, *a):
        pass

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("runner", grid, args))


class _Kernel:
    """Stands for a JITFunction: X, n, s at run time; A (constexpr) and B (constexpr, default 7)."""

    arg_names = ["X", "n", "s", "A", "B"]

    @staticmethod
    def fn(X, n, s, A, B=7):  # the Python function a JITFunction wraps
        pass

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append(("triton", grid, args, meta)) or _Compiled(self.calls)


def test_signature_keys_the_launcher(monkeypatch):
    monkeypatch.setattr(launch, "_RUNNERS", {})
    kernel, x = _Kernel(), torch.zeros(8)
    meta = {"A": 1, "num_warps": 4}
    run = [
        ((3,), (x, 5, 0.5), meta),  # first: Triton
        ((3,), (x, 5, 0.25), meta),  # another float only: the launcher, the new value passed
        ((3,), (x, 6, 0.5), meta),  # another int: Triton
        ((3,), (x.half(), 5, 0.5), meta),  # another dtype: Triton
        ((3,), (x[1:], 5, 0.5), meta),  # 4-byte aligned only: Triton
        ((4,), (x, 5, 0.5), meta),  # another grid: Triton
        ((3,), (x, 5, 0.5), {"A": 2, "num_warps": 4}),  # another constexpr: Triton
        ((3,), (x, 5, 0.5), meta),  # the first signature again: the launcher
    ]
    for grid, args, m in run:
        launch.launch(kernel, grid, args, m)
    assert [c[0] for c in kernel.calls] == ["triton", "runner", "triton", "triton", "triton", "triton", "triton",
                                            "runner"]
    # the launcher takes every parameter in order, the constexprs from meta or their defaults
    assert kernel.calls[1][1] == (3, 1, 1) and kernel.calls[1][2] == (x, 5, 0.25, 1, 7)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(launch, "_RUNNERS", {})
    monkeypatch.setattr(launch, "CACHE_LIMIT", 3)
    kernel, x = _Kernel(), torch.zeros(8)
    for n in range(5):
        launch.launch(kernel, (1,), (x, n, 1.0), {"A": 1})
    assert len(launch._RUNNERS) <= 3


def test_interpreter_result_is_not_cached(monkeypatch):
    # under TRITON_INTERPRET the launch returns no compiled kernel: every call goes through Triton
    monkeypatch.setattr(launch, "_RUNNERS", {})
    calls = []

    class Interpreted:
        arg_names = ["X"]

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append(grid)

    kernel = Interpreted()
    for _ in range(2):
        launch.launch(kernel, (2,), (torch.zeros(2),), {})
    assert calls == [(2,), (2,)] and not launch._RUNNERS


def test_host_helpers_match_triton():
    import triton

    assert all(launch.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 5000))
    assert all(launch.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))
