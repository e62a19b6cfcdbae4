"""Multiply-adds (MACs) and parameter counts, as DeiT and the MiTA paper report them.

Every matmul, linear and convolution of a forward pass is counted, attention matmuls included
(for MiTA: landmark-key scores, gate scores, shared values and the ``m + r k`` attention);
normalisations, softmax, activations, pooling and additions are not. The counts come from
``torch.utils.flop_counter.FlopCounterMode`` (which counts FLOPs = 2 MACs) with formulas added for
what it cannot see on its own:

- the CPU (and "overrideable"/MPS) fused SDPA ops, which it counts as 0;
- ``torch.ops.mita.mita_attention_counted``, the opaque op that ``mita.functional.mita_attention``
  dispatches to under ``mita.functional.counting_flops()``, counted by ``mita_attention_macs``.

Example::

    import timm, torch, mita.models
    from mita.utils.flops import count_flops, count_params
    model = timm.create_model("mita_deit_small_patch16_224")
    count_flops(model, torch.randn(1, 3, 224, 224)) / 1e9   # ~4.41 GMACs
    count_params(model) / 1e6                                 # ~22.1 M
"""
import contextlib
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "count_params", "flop_formulas", "flops_table", "format_flops_table", "PUBLISHED"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

# (GMACs, M params) as the papers print them. MiTA rows: the official model zoo (spec section 4),
# whose FLOPs are the honest count truncated to one decimal. DeiT rows: the values commonly cited
# for DeiT (rounded), with params from the DeiT model zoo.
PUBLISHED: Dict[str, tuple] = {
    "deit_tiny_patch16_224": (1.3, 5.7),
    "deit_small_patch16_224": (4.6, 22.0),
    "mita_deit_tiny_patch16_224": (1.1, 5.7),
    "mita_dwc_deit_tiny_patch16_224": (1.1, 5.7),
    "mita_deit_small_patch16_224": (4.4, 22.0),
    "mita_dwc_deit_small_patch16_224": (4.4, 22.0),
    "mita_dwc_gate_deit_small_patch16_224": (4.7, 22.0),
    "mita_vit5_small": (4.5, 22.0),
    "mita_dwc_vit5_small": (4.5, 22.0),
}


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_MITA_ARGS = ("q", "k", "v", "landmarks", "topk", "router_topk", "shared", "shared_scale")


def _mita_counted(*args, out_shape=None, **kwargs) -> int:
    from mita.functional import mita_attention_macs

    # The op's schema: (q, k, v, landmarks, topk, router_topk, shared, shared_scale); tensors arrive
    # as their shapes.
    a = dict(zip(_MITA_ARGS, args), **kwargs)
    B, H, N, d = a["q"]
    m = a["landmarks"][2]
    return 2 * mita_attention_macs(B, H, N, d, m, a["topk"], a["router_topk"], a["shared"])


def flop_formulas() -> Dict[Any, Callable]:
    """FlopCounterMode ``custom_mapping`` for the ops it counts as 0 (shape-based formulas, in FLOPs).

    Passed per counter rather than registered globally, so importing this module changes nothing
    for other users of ``FlopCounterMode``. Ops missing from the running torch build are skipped.
    """
    mapping: Dict[Any, Callable] = {}
    # Forward SDPA variants whose first three arguments are q, k, v [B, H, N, d]; the CUDA ones
    # (flash, efficient, cudnn) are already in torch's registry.
    for name in ("_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_fused_attention_overrideable",
                 "_scaled_dot_product_attention_math_for_mps"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_forward
    # Backward variants: grad_out, q, k, v first.
    for name in ("_scaled_dot_product_flash_attention_for_cpu_backward",
                 "_scaled_dot_product_fused_attention_overrideable_backward"):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _sdpa_backward
    # Importing mita.functional defines the custom op.
    import mita.functional  # noqa: F401

    mapping[torch.ops.mita.mita_attention_counted] = _mita_counted
    return mapping


def _as_args(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise ValueError(f"inputs must be a Tensor, a tuple/list of positional inputs or a dict of keyword "
                     f"inputs, got {type(inputs).__name__}")


def count_flops(model: torch.nn.Module, inputs) -> int:
    """Multiply-adds of one forward pass of ``model`` on ``inputs`` (the whole batch), in eval mode.

    Args:
        model: any module; its train/eval state is restored afterwards.
        inputs: a Tensor, a tuple of positional inputs or a dict of keyword inputs.

    Returns:
        MACs as an int (FLOPs / 2), counted as DeiT and the MiTA paper count them.
    """
    from mita.functional import counting_flops

    args, kwargs = _as_args(inputs)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=flop_formulas())
    try:
        with torch.no_grad(), counting_flops(), counter:
            model(*args, **kwargs)
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    if flops % 2:
        logger.warning("odd FLOP count %d: some op is not counted as multiply-adds", flops)
    return flops // 2


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``trainable_only`` keeps requires_grad ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_table(model_names: Iterable[str], img_size: Optional[int] = None,
                num_classes: int = 1000) -> List[Dict[str, Any]]:
    """Build each timm model by name (random weights) and count its MACs and parameters.

    Args:
        model_names: timm names; the ``mita_*`` zoo names are registered by importing ``mita.models``.
        img_size: square input side; ``None`` takes the model's default input size (224 for DeiT).
        num_classes: classifier width (1000 for ImageNet-1K, as the published numbers).

    Returns:
        One dict per model: ``model``, ``input_size`` (C, H, W), ``gmacs``, ``mparams``, and
        ``published_gflops`` / ``published_mparams`` (None where no paper prints them).
    """
    import timm

    with contextlib.suppress(ImportError):
        import mita.models  # noqa: F401  (registers the zoo names with timm)

    rows = []
    for name in model_names:
        kwargs = {"num_classes": num_classes}
        if img_size is not None:
            kwargs["img_size"] = img_size
        model = timm.create_model(name, pretrained=False, **kwargs)
        if img_size is None:
            input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
        else:
            input_size = (3, img_size, img_size)
        # A fixed input: no count depends on the values, but data-dependent routing stays reproducible.
        x = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
        published = PUBLISHED.get(name, (None, None))
        rows.append({
            "model": name,
            "input_size": input_size,
            "gmacs": count_flops(model, x) / 1e9,
            "mparams": count_params(model) / 1e6,
            "published_gflops": published[0],
            "published_mparams": published[1],
        })
    return rows


def format_flops_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`flops_table` rows: honest counts beside the published ones."""
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = ["| model | input | GMACs (counted) | GFLOPs (published) | params M (counted) | params M (published) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        size = "x".join(str(s) for s in r["input_size"][1:])
        lines.append(f"| {r['model']} | {size} | {r['gmacs']:.3f} | {fmt(r['published_gflops'], '.1f')} | "
                     f"{r['mparams']:.2f} | {fmt(r['published_mparams'], '.1f')} |")
    return "\n".join(lines)
