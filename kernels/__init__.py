"""Triton kernels for MiTA, installed as ``mita.kernels``.

The kernels arrive with issue 3; until then ``available()`` is False and
``mita.functional.mita_attention(impl="auto")`` uses the PyTorch path.
"""


def available() -> bool:
    """Whether Triton kernels are implemented and importable here."""
    return False
