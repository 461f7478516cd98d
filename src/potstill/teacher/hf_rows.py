"""The running batch of the hf backend's decoding loop: rows of requests at different stages.

Every row is left-padded to the batch's common length, so the KV cache is one [B, H, L, D]
tensor per layer and the 2-D attention mask says which columns each row attends. Rows leave the
batch the step they finish (`keep`) and newcomers join it (`join`, after their own `prefill`):
the shorter side of the two caches is padded on the left, which changes no row's attention (a
padded key's weight is exactly zero) but lets one forward serve all rows. Columns no row attends
any more are cut off (`keep`), so a long-finished row's history costs nothing.

Joining needs every cache layer to be a plain full-attention layer; a sliding-window layer keeps
only its window and cannot be padded this way (`joinable`), so such models decode in static
batches (a batch ends before the next starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rows:
    cache: object
    """The model's DynamicCache over these rows."""
    mask: torch.Tensor
    """[B, L] 1 where a row attends a column of the cache."""
    next_pos: torch.Tensor
    """[B] the position id of each row's next token."""
    logits: torch.Tensor
    """[B, V] each row's next-token logits."""
    requests: list[int]
    """Batch row -> request index."""

    def __len__(self) -> int:
        return len(self.requests)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def joinable(model) -> bool:
    """Whether rows of this model can join a running batch (every cache layer full-attention)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in new_cache(model).layers)


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, requests: list[int]) -> Rows:
    """Run the (left-padded) prompts; their rows, ready to sample their first token."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache(model)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    return Rows(cache, mask, positions[:, -1] + 1, logits, list(requests))


def step(model, rows: Rows, tokens: list[int]) -> Rows:
    """Feed each row its last sampled token; the rows with their next logits."""
    ids = torch.tensor(tokens, device=rows.mask.device)[:, None]
    mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows), 1)], dim=-1)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=rows.next_pos[:, None],
        past_key_values=rows.cache,
        use_cache=True,
    ).logits[:, -1]
    return Rows(rows.cache, mask, rows.next_pos + 1, logits, rows.requests)


def keep(rows: Rows, kept: list[int]) -> Rows:
    """Only the batch rows `kept`, and only the columns one of them attends."""
    index = torch.tensor(kept, device=rows.mask.device)
    rows.cache.batch_select_indices(index)
    mask = rows.mask[index]
    first = int(mask.any(dim=0).int().argmax())  # the leftmost column still attended
    if first:
        mask = mask[:, first:]
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return Rows(
        rows.cache, mask, rows.next_pos[index], rows.logits[index], [rows.requests[b] for b in kept]
    )


def join(rows: Rows, newcomers: Rows) -> Rows:
    """One batch of both: the shorter cache left-padded to the longer, rows after rows."""
    width = max(rows.mask.shape[1], newcomers.mask.shape[1])
    for old, new in zip(rows.cache.layers, newcomers.cache.layers, strict=True):
        old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
        old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
    mask = torch.cat([_pad_left(rows.mask, width), _pad_left(newcomers.mask, width)])
    return Rows(
        rows.cache,
        mask,
        torch.cat([rows.next_pos, newcomers.next_pos]),
        torch.cat([rows.logits, newcomers.logits]),
        rows.requests + newcomers.requests,
    )


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros on the left of the sequence axis (-2 for a [B, H, L, D] cache, -1 for a mask)."""
    axis = -2 if tensor.dim() == 4 else -1
    missing = width - tensor.shape[axis]
    if not missing:
        return tensor
    return F.pad(tensor, (0, 0, missing, 0) if axis == -2 else (missing, 0))
