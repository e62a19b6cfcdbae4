"""Tile layout of the (query, slot) entries of a routing, grouped by expert: torch only, no Triton.

Shared by ``mita.functional``'s memory-efficient PyTorch path and the general Triton kernels (ops.py).
"""
import torch


def expert_tiles(expert: torch.Tensor, m: int, N: int, r: int) -> dict:
    """Group (query, slot) entries by expert into tiles of ``tile`` entries that hold one expert each.

    ``expert`` [G, N*r] holds the expert of entry ``n*r + j``. Expert e fills ceil(count_e / tile) tiles;
    with tile = ceil(N r / m) the static bound ``num_tiles = ceil((N r + m (tile - 1)) / tile)`` holds for
    every routing, so shapes never depend on the data and nothing syncs with the host.
    Returns index tensors (all int64):
      slot_token  [G, S*T]  token whose query fills each tile slot (N = padding),
      slot_source [G, S*T]  entry n*r+j that fills each slot (N*r = padding),
      slot_of     [G, N*r]  slot that holds each entry,
      tile_expert [G, S]    expert of each tile (0 for unused tiles),
      tile_count  [G, S]    entries in each tile (slots fill from the start; 0 for unused tiles),
      expert_start [G, m]   first slot of each expert: its entries fill the slots
                            ``expert_start .. expert_start + expert_count - 1`` (every tile but its last is full),
      expert_count [G, m]   entries of each expert.
    """
    G, E = expert.shape
    device = expert.device
    tile = max(1, -(-E // m))
    num_tiles = -(-(E + m * (tile - 1)) // tile)
    order = torch.argsort(expert, dim=-1, stable=True)  # [G, E]
    sorted_expert = expert.gather(1, order)
    counts = torch.zeros(G, m, dtype=torch.long, device=device).scatter_add_(1, expert, torch.ones_like(expert))
    starts = counts.cumsum(1) - counts  # first sorted position of each expert
    tiles_per_expert = (counts + tile - 1) // tile
    tile_starts = tiles_per_expert.cumsum(1) - tiles_per_expert
    rank = torch.arange(E, device=device).expand(G, E) - starts.gather(1, sorted_expert)  # rank within expert
    tile_id = tile_starts.gather(1, sorted_expert) + rank // tile  # [G, E]
    slot = tile_id * tile + rank % tile  # [G, E] slot of each sorted entry
    num_slots = num_tiles * tile
    slot_token = torch.full((G, num_slots), N, dtype=torch.long, device=device).scatter_(1, slot, order // r)
    slot_source = torch.full((G, num_slots), E, dtype=torch.long, device=device).scatter_(1, slot, order)
    slot_of = torch.empty_like(order).scatter_(1, order, slot)
    tile_expert = torch.zeros(G, num_tiles, dtype=torch.long, device=device).scatter_(1, tile_id, sorted_expert)
    tile_count = torch.zeros(G, num_tiles, dtype=torch.long, device=device).scatter_add_(
        1, tile_id, torch.ones_like(tile_id)
    )
    return {
        "tile_count": tile_count,
        "tile": tile,
        "num_tiles": num_tiles,
        "slot_token": slot_token,
        "slot_source": slot_source,
        "slot_of": slot_of,
        "tile_expert": tile_expert,
        "expert_start": tile_starts * tile,
        "expert_count": counts,
    }


def _sort_keys(flat: torch.Tensor, N: int) -> torch.Tensor:
    """The key lists as the narrowest integers that hold them (int16 below 2^15 keys, int32 below 2^31) for the
    inverse index's stable sort: a radix sort's passes go by the key's bits (8 for int64 on a GPU, 4 for int32)."""
    dtype = torch.int16 if N < 1 << 15 else torch.int32 if N < 1 << 31 else flat.dtype  # N itself too (bounds)
    return flat.to(dtype)


def key_pairs(topk_idx: torch.Tensor, N: int):
    """Inverse index of the experts' key lists: for each key, the (expert, slot) pairs that hold it.

    ``topk_idx`` [G, m, k] (values in [0, N)). Returns ``pair_order`` [G, m k] (int64), the pairs
    ``e k + j`` sorted by key (stably, so each key's pairs come in increasing order), and ``key_ptr``
    [G, N + 1] (int64): the pairs of key i are ``pair_order[key_ptr[i]:key_ptr[i + 1]]`` (a CSR; a key
    held by no expert has none, one listed twice by an expert has two). Static shapes, no host sync.
    """
    G = topk_idx.shape[0]
    flat = _sort_keys(topk_idx.reshape(G, -1), N)
    sorted_keys, pair_order = torch.sort(flat, dim=-1, stable=True)
    bounds = torch.arange(N + 1, device=flat.device, dtype=flat.dtype).expand(G, N + 1).contiguous()
    key_ptr = torch.searchsorted(sorted_keys.contiguous(), bounds)  # first sorted position >= each key
    return pair_order.contiguous(), key_ptr
