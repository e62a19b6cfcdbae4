"""The paper's analyses of a trained checkpoint: token pruning, experts, routing overlap, (m, k) grid, swaps.

Each analysis is a function that takes a ``train.py`` checkpoint, writes a PNG plus its numbers (JSON and
CSV) to an output folder and returns the JSON payload; ``python -m mita.analysis NAME`` (:mod:`.cli`) runs them:

=================================  ===========  ============================================
function                           command      paper
=================================  ===========  ============================================
:func:`~.pruning.token_pruning`    ``pruning``  Fig. 4: tokens no routed expert keeps
:func:`~.experts.expert_maps`      ``experts``  Fig. 3: window, top-k keys, routed queries
:func:`~.overlap.routing_overlap`  ``overlap``  Fig. 5: IoU of keys and routed queries
:func:`~.mk_grid.mk_grid`          ``mk_grid``  Fig. 7: other (m, k) at inference
:func:`~.swap.swap_matrix`         ``swap``     Fig. 8: weights x attention matrix
=================================  ===========  ============================================

Run folders become tables through :mod:`~.sweep` (an m x k sweep, ``scripts/collect_sweep.py``; the ablation
tables of ``python -m mita.analysis ablations``) and :mod:`~.reproduction` (the small-scale reproduction's tables
and figures, ``scripts/collect_repro.py``).

Routing decisions are read through the routing hook of the attention modules, never by re-implementing
the attention: ``module.capture_routing = True`` makes each forward of a
:class:`~mita.attention.mita.MiTAAttention` call :func:`mita.functional.mita_attention` with
``return_routing=True`` and keep ``module.last_routing = (topk_idx [B, H, m, k], expert_idx [B, H, N, r])``
(token indices, prefix tokens included; ``last_landmarks`` [B, H, m, d] beside them).
:func:`~.common.capture_routing` switches the hook on for every MiTA module of a model for a ``with``
block and :func:`~.common.iter_routing` yields one :class:`~.common.LayerRouting` per layer and batch.
"""
from mita.analysis.common import Checkpoint, LayerRouting, capture_routing, iter_routing, read_checkpoint
from mita.analysis.experts import expert_maps
from mita.analysis.mk_grid import mk_grid
from mita.analysis.overlap import routing_overlap
from mita.analysis.pruning import token_pruning
from mita.analysis.swap import swap_matrix

__all__ = [
    "Checkpoint",
    "LayerRouting",
    "capture_routing",
    "expert_maps",
    "iter_routing",
    "mk_grid",
    "read_checkpoint",
    "routing_overlap",
    "swap_matrix",
    "token_pruning",
]
