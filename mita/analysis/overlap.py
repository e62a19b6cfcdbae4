"""Routing overlap (the paper's Fig. 5): do an expert's keys sit where its queries are?

Per layer, the IoU between the positions an expert gathers (its top-k keys) and the positions of the
queries routed to it, averaged over experts, heads and images (``mean_iou``); the band is the minimum and
maximum over images of the per-image mean. If routing were mere clustering (each expert serving and
reading one region) the IoU would approach 1; ``chance_iou`` is what random sets of the same sizes give.
``idle_fraction`` is the fraction of experts that receive no query.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch

from mita.analysis import common
from mita.analysis.routing import expert_iou

__all__ = ["routing_overlap"]

_logger = logging.getLogger(__name__)


def routing_overlap(ckpt_path: str, out: str, *, overrides: Sequence[str] = (), max_images: Optional[int] = None,
                    split: str = "val", batch_size: int = 256, num_workers: int = 0, device: str = "auto",
                    progress: bool = True) -> Dict[str, Any]:
    """Write ``overlap.png``, ``overlap.json`` and ``overlap.csv`` to ``out``; returns the JSON payload."""
    ckpt, ov, dev, model, info, n_layers = common.open_checkpoint(ckpt_path, overrides, device)
    data = common.load_eval_data(ckpt, ov["data"], split=split, max_images=max_images, batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=dev.type == "cuda")

    # Per layer: sums over valid (image, head, expert) of IoU and chance IoU, their count, idle experts,
    # all experts; per-image means; per-head sums.
    sums = torch.zeros(n_layers, 5, dtype=torch.float64)
    per_image = [[] for _ in range(n_layers)]
    per_head: Dict[int, torch.Tensor] = {}
    for _, _, _, routing in common.iter_routing(model, data, dev, desc="overlap", progress=progress):
        for lr in routing:
            iou, chance, valid = expert_iou(lr.topk_idx, lr.expert_idx)  # [B, H, m] each
            counts = torch.zeros(iou.shape, dtype=torch.float64, device=iou.device).scatter_add_(
                -1, lr.expert_idx.flatten(2), torch.ones_like(lr.expert_idx.flatten(2), dtype=torch.float64))
            idle = counts == 0  # [B, H, m] experts that no query chose
            v = valid.double()
            sums[lr.layer] += torch.tensor([(iou * v).sum().item(), (chance * v).sum().item(), v.sum().item(),
                                            idle.sum().item(), idle.numel()], dtype=torch.float64)
            per_image[lr.layer].append(((iou * v).sum((1, 2)) / v.sum((1, 2)).clamp_min(1)).cpu())  # [B]
            head = torch.stack([(iou * v).sum((0, 2)), v.sum((0, 2))]).cpu()  # [2, H]
            per_head[lr.layer] = per_head.get(lr.layer, 0) + head
    rows = []
    for layer in range(n_layers):
        s = sums[layer]
        images = torch.cat(per_image[layer]) if per_image[layer] else torch.zeros(0)
        head = per_head.get(layer)
        rows.append({
            "layer": layer,
            "mean_iou": s[0].item() / s[2].item() if s[2] else None,
            "min_iou": images.min().item() if images.numel() else None,
            "max_iou": images.max().item() if images.numel() else None,
            "chance_iou": s[1].item() / s[2].item() if s[2] else None,
            "idle_fraction": s[3].item() / s[4].item() if s[4] else None,
            "per_head_iou": (head[0] / head[1].clamp_min(1)).tolist() if head is not None else None,
        })

    from mita.analysis.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    xs = [r["layer"] for r in rows if r["mean_iou"] is not None]
    pick = [r for r in rows if r["mean_iou"] is not None]
    ax.fill_between(xs, [r["min_iou"] for r in pick], [r["max_iou"] for r in pick], color="tab:blue", alpha=0.2,
                    label="min-max over images")
    ax.plot(xs, [r["mean_iou"] for r in pick], "o-", color="tab:blue", label="mean IoU")
    ax.plot(xs, [r["chance_iou"] for r in pick], "--", color="gray", label="random sets of the same sizes")
    ax.set_xlabel("layer")
    ax.set_ylabel("IoU(keys, routed queries)")
    ax.set_ylim(0, 1)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    n_images = len(torch.cat(per_image[0])) if per_image[0] else 0
    ax.set_title(f"Routing overlap: {ckpt.label}, {n_images} images", fontsize=9)

    payload = {
        "analysis": "routing_overlap",
        "ckpt": ckpt.path,
        "epoch": ckpt.epoch,
        "attention": info["attention"],
        "data": data.config.get("name"),
        "split": split,
        "n_images": n_images,
        "layers": rows,
    }
    os.makedirs(out, exist_ok=True)
    common.write_json(os.path.join(out, "overlap.json"), payload)
    common.write_csv(os.path.join(out, "overlap.csv"), [{k: v for k, v in r.items() if k != "per_head_iou"}
                                                         for r in rows])
    save_figure(fig, os.path.join(out, "overlap.png"))
    _logger.info("overlap: mean IoU per layer %s", [None if r["mean_iou"] is None else round(r["mean_iou"], 3)
                                                   for r in rows])
    return payload
