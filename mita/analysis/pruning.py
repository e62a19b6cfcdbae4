"""Token pruning (the paper's Fig. 4): which key/value positions MiTA's routed experts keep, per layer.

For a few images, each layer's panel shades the patches that no routed expert of any head selected among
its top-k keys (those tokens reach the queries only through the shared expert's pooled values). Over a
dataset, per layer: the fraction of the N tokens that no expert selected (``pruned_fraction``), the
fraction not selected by any expert that receives a query (``unused_fraction``, >= pruned), the same
per head (``pruned_fraction_per_head``, mean over heads) and how often the prefix (cls) token is selected.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Sequence

import torch

from mita.analysis import common
from mita.analysis.routing import key_masks, token_selection

__all__ = ["token_pruning"]

_logger = logging.getLogger(__name__)


def _check_indices(values: Optional[Sequence[int]], size: int, arg: str, what: str):
    if values is None:
        return None
    values = [int(v) for v in values]
    bad = [v for v in values if not 0 <= v < size]
    if not values or bad:
        raise ValueError(f"{arg}={values}: {what} must be in [0, {size - 1}]")
    return values


def token_pruning(ckpt_path: str, out: str, *, overrides: Sequence[str] = (), images: Sequence[int] = (0, 1, 2, 3),
                  layers: Optional[Sequence[int]] = None, max_images: Optional[int] = None, split: str = "val",
                  batch_size: int = 256, num_workers: int = 0, device: str = "auto",
                  progress: bool = True) -> Dict[str, Any]:
    """Write ``pruning.png``, ``pruning.json`` and ``pruning.csv`` to ``out``; returns the JSON payload.

    ``images``: dataset indices to draw; ``layers``: MiTA layers (0-based) to draw (default all; the
    dataset numbers cover every layer); ``max_images``: images of the dataset statistics (default all).
    """
    ckpt, ov, dev, model, info, n_layers = common.open_checkpoint(ckpt_path, overrides, device)
    layers = _check_indices(layers, n_layers, "layers", "MiTA layer indices") or list(range(n_layers))
    data = common.load_eval_data(ckpt, ov["data"], split=split, max_images=max_images, batch_size=batch_size,
                                 num_workers=num_workers, pin_memory=dev.type == "cuda")
    split_set = common.whole_split(data)
    images = _check_indices(images, len(split_set), "images", "image indices")

    # Dataset statistics: token counts per layer (float64 sums, exact for any dataset size).
    sums = torch.zeros(n_layers, 6, dtype=torch.float64)
    correct = total = 0
    routing = []
    for _, targets, logits, routing in common.iter_routing(model, data, dev, desc="pruning", progress=progress):
        correct += int((logits.argmax(-1).cpu() == targets).sum())
        total += targets.numel()
        for lr in routing:
            selected, used = token_selection(lr.topk_idx, lr.expert_idx)  # [B, N]
            per_head = key_masks(lr.topk_idx, lr.n_tokens).any(dim=2)  # [B, H, N]
            p = lr.prefix
            sums[lr.layer] += torch.tensor([
                (~selected).sum().item(), (~used).sum().item(), (~per_head).double().mean(1).sum().item(),
                (~selected[:, p:]).sum().item(), selected[:, :p].sum().item(), selected.shape[0],
            ], dtype=torch.float64)
    rows = []
    for lr in routing:
        s = sums[lr.layer]
        n_img, N, p = s[5].item(), lr.n_tokens, lr.prefix
        rows.append({
            "layer": lr.layer,
            "module": lr.name,
            "pruned_fraction": s[0].item() / (n_img * N),
            "unused_fraction": s[1].item() / (n_img * N),
            "pruned_fraction_per_head": s[2].item() / (n_img * N),
            "pruned_patch_fraction": s[3].item() / (n_img * (N - p)),
            "prefix_selected_fraction": s[4].item() / (n_img * p) if p else None,
            "n_tokens": N,
            "num_landmarks": lr.num_landmarks,
            "topk": lr.topk_idx.shape[-1],
        })

    # The drawn images: one batch through the model with the hook on.
    batch = torch.stack([split_set[i][0] for i in images])
    drawn = common.EvalData(dataset=None, loader=[(batch, torch.zeros(len(images), dtype=torch.long))],
                            config=data.config)
    _, _, _, routing = next(common.iter_routing(model, drawn, dev, progress=False))
    pictures = common.unnormalize(batch, data.config).numpy()  # [n, H, W, C]
    kept = {lr.layer: token_selection(lr.topk_idx, lr.expert_idx)[0].cpu() for lr in routing}  # [n, N]
    lr0 = routing[0]
    h, w = lr0.grid

    from mita.analysis.plots import draw_image, pyplot

    plt = pyplot()
    n_cols = 1 + len(layers)
    fig = plt.figure(figsize=(1.3 * n_cols + 0.4, 1.3 * len(images) + 2.4))
    grid = fig.add_gridspec(len(images) + 1, n_cols, height_ratios=[1] * len(images) + [1.8], hspace=0.45)
    red = torch.tensor([0.85, 0.1, 0.1])
    for r, index in enumerate(images):
        ax = fig.add_subplot(grid[r, 0])
        draw_image(ax, pictures[r])
        ax.set_ylabel(f"#{index}", fontsize=8)
        if r == 0:
            ax.set_title("input", fontsize=8)
        for c, layer in enumerate(layers):
            ax = fig.add_subplot(grid[r, c + 1])
            draw_image(ax, pictures[r])
            pruned = ~kept[layer][r, lr0.prefix:].view(h, w)  # [h, w]
            shade = torch.zeros(h, w, 4)
            shade[..., :3] = red
            shade[..., 3] = pruned.float() * 0.7
            H, W = pictures[r].shape[:2]
            ax.imshow(shade.numpy(), interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
            ax.set_xlabel(f"{pruned.float().mean().item():.0%} pruned", fontsize=7)
    ax = fig.add_subplot(grid[len(images), :])
    xs = [row["layer"] for row in rows]
    ax.plot(xs, [row["pruned_fraction"] for row in rows], "o-", color="tab:red", label="no expert selected (any head)")
    ax.plot(xs, [row["unused_fraction"] for row in rows], "s--", color="tab:orange",
            label="not kept by an expert with queries")
    ax.plot(xs, [row["pruned_fraction_per_head"] for row in rows], "^:", color="tab:blue", label="per head (mean)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"tokens left to the shared expert only, over {int(sums[0, 5].item())} images", fontsize=9)
    fig.suptitle(f"Token pruning: {ckpt.label} (red: kept by no routed expert)", fontsize=10)

    os.makedirs(out, exist_ok=True)
    payload = {
        "analysis": "token_pruning",
        "ckpt": ckpt.path,
        "epoch": ckpt.epoch,
        "attention": info["attention"],
        "data": data.config.get("name"),
        "split": split,
        "n_images": int(sums[0, 5].item()),
        "acc1": 100.0 * correct / max(total, 1),
        "images_drawn": images,
        "layers": rows,
        "drawn": [{"index": i, "pruned_patch_fraction": {str(l): (~kept[l][r, lr0.prefix:]).float().mean().item()
                                                         for l in layers}} for r, i in enumerate(images)],
    }
    common.write_json(os.path.join(out, "pruning.json"), payload)
    common.write_csv(os.path.join(out, "pruning.csv"), rows)
    from mita.analysis.plots import save_figure

    save_figure(fig, os.path.join(out, "pruning.png"))
    _logger.info("pruning: %s", ", ".join(f"L{r['layer']} {r['pruned_fraction']:.2f}" for r in rows))
    return payload
