"""Deformable experts (the paper's Fig. 3): a landmark's pooling window, its top-k keys and its queries.

For one image and chosen (layer, landmark) pairs, three heatmaps over the patch grid, averaged over heads:
the landmark's pooling window (the ``AdaptiveAvgPool2d`` cell it averages; pools ``grid`` and ``official``
only), the fraction of heads whose expert j keeps each patch among its top-k keys, and the fraction of heads
that route each patch's query to expert j. The window is outlined on every panel, so keys reached outside
it show directly. Over a dataset, per layer: the mean fraction of an expert's keys outside its window
(``outside_window_fraction``) against what k uniformly random keys would give (``chance``, 1 - |window| / N).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch

from mita.analysis import common
from mita.analysis.routing import key_masks, landmark_windows, outside_window_fraction, query_masks

__all__ = ["expert_maps"]

_logger = logging.getLogger(__name__)


def _default_landmarks(m: int, landmark_grid) -> list:
    """Corner, centre and opposite corner of the landmark grid."""
    if landmark_grid is None:
        return sorted({0, m // 2, m - 1})
    ph, pw = landmark_grid
    return sorted({0, (ph // 2) * pw + pw // 2, m - 1})


def _box(mask_hw: torch.Tensor):
    """Bounding box (r0, r1, c0, c1) of a non-empty [h, w] mask, else None."""
    rows, cols = mask_hw.any(1).nonzero().flatten(), mask_hw.any(0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


def expert_maps(ckpt_path: str, out: str, *, overrides: Sequence[str] = (), image: int = 0,
                layers: Optional[Sequence[int]] = None, experts: Optional[Sequence[int]] = None,
                max_images: Optional[int] = None, split: str = "val", batch_size: int = 256, num_workers: int = 0,
                device: str = "auto", progress: bool = True) -> Dict[str, Any]:
    """Write ``experts.png``, ``experts.json`` and ``experts.csv`` to ``out``; returns the JSON payload.

    ``image``: dataset index of the drawn image; ``layers``: MiTA layers (default first, middle, last);
    ``experts``: landmark indices (default a corner, the centre and the opposite corner of the landmark grid).
    """
    ckpt, ov, dev, model, info, n_layers = common.open_checkpoint(ckpt_path, overrides, device)
    if layers is None:
        layers = sorted({0, n_layers // 2, n_layers - 1})
    layers = [int(v) for v in layers]
    if not layers or any(not 0 <= v < n_layers for v in layers):
        raise ValueError(f"layers={layers}: MiTA layer indices must be in [0, {n_layers - 1}]")
    data = common.load_eval_data(ckpt, ov["data"], split=split, max_images=max_images, batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=dev.type == "cuda")
    split_set = common.whole_split(data)
    if not 0 <= int(image) < len(split_set):
        raise ValueError(f"image={image}: the image index must be in [0, {len(split_set) - 1}]")

    # Dataset statistics: keys outside the landmark's window, per layer.
    sums = torch.zeros(n_layers, 3, dtype=torch.float64)  # outside sum, chance sum, experts counted
    windows_of: Dict[int, Optional[torch.Tensor]] = {}
    for _, _, _, routing in common.iter_routing(model, data, dev, desc="experts", progress=progress):
        for lr in routing:
            if lr.layer not in windows_of:
                windows_of[lr.layer] = landmark_windows(lr.pool, lr.grid, lr.landmark_grid, lr.prefix, lr.n_tokens)
            windows = windows_of[lr.layer]
            if windows is None or lr.topk_idx.shape[-1] == 0:
                continue
            outside = outside_window_fraction(lr.topk_idx, windows)  # [B, H, m]
            chance = 1.0 - windows.double().sum(-1) / lr.n_tokens  # [m]
            B, H, m = outside.shape
            sums[lr.layer] += torch.tensor([outside.sum().item(), chance.sum().item() * B * H, B * H * m],
                                           dtype=torch.float64)
    layer_rows = []
    for layer in range(n_layers):
        count = sums[layer, 2].item()
        layer_rows.append({
            "layer": layer,
            "outside_window_fraction": sums[layer, 0].item() / count if count else None,
            "chance": sums[layer, 1].item() / count if count else None,
        })

    # The drawn image.
    picture_t, _ = split_set[int(image)]
    drawn = common.EvalData(dataset=None, loader=[(picture_t[None], torch.zeros(1, dtype=torch.long))],
                            config=data.config)
    _, _, _, routing = next(common.iter_routing(model, drawn, dev, progress=False))
    picture = common.unnormalize(picture_t[None], data.config)[0].numpy()  # [H, W, C]
    m = routing[0].num_landmarks
    if experts is None:
        experts = _default_landmarks(m, routing[0].landmark_grid)
    experts = [int(v) for v in experts]
    if not experts or any(not 0 <= v < m for v in experts):
        raise ValueError(f"experts={experts}: landmark indices must be in [0, {m - 1}] (num_landmarks={m})")

    from matplotlib.patches import Rectangle

    from mita.analysis.plots import draw_image, overlay_patches, pyplot, save_figure

    plt = pyplot()
    pairs = [(layer, j) for layer in layers for j in experts]
    fig, axes = plt.subplots(len(pairs), 3, figsize=(6.6, 2.0 * len(pairs) + 0.6), squeeze=False)
    H, W = picture.shape[:2]
    rows = []
    for r, (layer, j) in enumerate(pairs):
        lr = routing[layer]
        h, w = lr.grid
        p, N = lr.prefix, lr.n_tokens
        windows = landmark_windows(lr.pool, lr.grid, lr.landmark_grid, p, N)
        keys = key_masks(lr.topk_idx, N)[0, :, j].float().mean(0).cpu()  # [N] fraction of heads
        queries = query_masks(lr.expert_idx, m)[0, :, j].float().mean(0).cpu()  # [N]
        window = windows[j] if windows is not None else None
        window_hw = window[p:].view(h, w) if window is not None else None
        panels = [
            (window_hw.float() if window_hw is not None else None, "Blues", "pooling window"),
            (keys[p:].view(h, w), "magma", f"top-{lr.topk_idx.shape[-1]} keys"),
            (queries[p:].view(h, w), "viridis", "routed queries"),
        ]
        box = _box(window_hw) if window_hw is not None else None
        for c, (values, cmap, title) in enumerate(panels):
            ax = axes[r, c]
            # Grey and darkened under the heatmaps, so the colours read as the map's.
            draw_image(ax, picture, dim=1.0 if c == 0 else 0.5)
            if values is not None:
                overlay_patches(ax, values.numpy(), (H, W), cmap=cmap, alpha=0.65)
            elif c == 0:
                ax.text(0.5, 0.5, f"pool={lr.pool}:\nno window", ha="center", va="center", fontsize=8,
                        transform=ax.transAxes, color="white")
            if box is not None:
                r0, r1, c0, c1 = box
                # Patch (i, j) covers pixels [i H / h, (i + 1) H / h).
                ax.add_patch(Rectangle((c0 * W / w - 0.5, r0 * H / h - 0.5), (c1 - c0 + 1) * W / w,
                                       (r1 - r0 + 1) * H / h, fill=False, edgecolor="cyan", linewidth=1.5))
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(f"layer {layer}\nexpert {j}", fontsize=8)
        outside = None
        if window is not None and lr.topk_idx.shape[-1]:
            outside = outside_window_fraction(lr.topk_idx[:, :, j:j + 1], window[None])[0, :, 0].mean().item()
        axes[r, 1].set_xlabel("outside window: " + (f"{outside:.0%}" if outside is not None else "n/a")
                              + (f", cls {keys[:p].mean().item():.0%}" if p else ""), fontsize=7)
        axes[r, 2].set_xlabel(f"{queries.sum().item():.1f} queries per head", fontsize=7)
        rows.append({
            "layer": layer,
            "expert": j,
            "keys_outside_window": outside,
            "window_size": int(window.sum().item()) if window is not None else None,
            "keys_per_head": lr.topk_idx.shape[-1],
            "queries_per_head": queries.sum().item(),
            "prefix_key_rate": keys[:p].mean().item() if p else None,
            "prefix_query_rate": queries[:p].mean().item() if p else None,
        })
    fig.suptitle(f"Experts of {ckpt.label}, image #{image} (mean over heads; cyan: pooling window)", fontsize=9)
    # tight_layout ignores the suptitle: keep a third of an inch above the column titles for it
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))

    payload = {
        "analysis": "experts",
        "ckpt": ckpt.path,
        "epoch": ckpt.epoch,
        "attention": info["attention"],
        "data": data.config.get("name"),
        "split": split,
        "image": int(image),
        "n_images": len(data.dataset),
        "layers": layer_rows,
        "drawn": rows,
    }
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "experts.json"), payload)
    common.write_csv(os.path.join(out, "experts.csv"), rows)
    save_figure(fig, os.path.join(out, "experts.png"))
    _logger.info("experts: keys outside the window per layer %s",
                 [None if r["outside_window_fraction"] is None else round(r["outside_window_fraction"], 3)
                  for r in layer_rows])
    return payload
