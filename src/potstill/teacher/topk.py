"""The teacher's top-k log-probs at target positions (what the offline cache stores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from potstill.losses.reduce import IGNORE_INDEX


def target_positions(labels: Tensor) -> Tensor:
    """(B, L) labels -> (B, L) bool: the positions whose next token is a target (row i of a
    record's cache is the i-th True of its row)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def target_hidden(model, batch: dict[str, Tensor]) -> tuple[Tensor, list[int]]:
    """Final hidden states at each record's target positions, concatenated: (N, H), and the
    number of rows of each record. The lm_head is not applied (see `target_logits`)."""
    device = model.get_output_embeddings().weight.device
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        use_cache=False,
    ).last_hidden_state  # (B, L, H)
    mask = target_positions(batch["labels"]).to(device)
    return hidden[mask], mask.sum(1).tolist()


def target_logits(model, hidden: Tensor) -> Tensor:
    """(n, H) final hidden states -> (n, V) float32 logits, as the model's forward makes them."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 style soft-capping
        logits = cap * torch.tanh(logits / cap)
    return logits


def top_k_rows(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(n, V) logits -> top-k ids (n, k), their log-probs (n, k) at `temperature`, descending,
    and the log of the mass outside them (n,) (-inf when k = V)."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = log_p.topk(k, dim=-1)
    log_tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, top, log_tail


def tail_lse(logits: Tensor, ids: Tensor, temperatures) -> Tensor:
    """(n, V) logits, (n, k) top-k ids -> (n, len(temperatures)): log Σ_tail p^(1/T_i), p the
    T = 1 distribution, over the ids outside the top k (what `cache_format.retemper` needs)."""
    log_p = F.log_softmax(logits.float(), dim=-1).scatter(-1, ids, float("-inf"))
    return torch.stack([(log_p / t).logsumexp(-1) for t in temperatures], -1)
