"""Log-probs of chosen tokens in many token rows, batched: the forward behind `reward_batch`.

    log π(x_p | x_<p) at the wanted positions p of each row, one flat float32 tensor.

Work the rewards never read is skipped:
- rows that share a prefix (a GRPO group's prompt; for the teacher, also the solution) form a
  cluster: the prefix runs once and its KV cache is expanded over the cluster's suffixes;
- a row's tokens after its last wanted position (closing tags) are not run;
- the lm_head runs only on the hidden states before wanted tokens, and log softmax(z / τ)[x] is
  z_x − logsumexp(z), a chunk of rows at a time: no (T, V) log_softmax is ever built;
- rows of one forward are bucketed by length, so little of a batch is padding.

Rows are right-padded and no attention mask is passed: in a causal decoder a token never attends
to later positions, so padding after a row's last token cannot change its hidden states.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

MIN_SHARED_PREFIX = 16
"""Shorter common prefixes are not worth a separate forward."""
PAD_SLACK = 0.1
"""A length bucket holds rows at most this fraction longer than its shortest."""


@torch.no_grad()  # a reward: out= buffers take no autograd
def target_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    temperature: float,
    chunk: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """log softmax(lm_head(hidden) / τ)[target] in float32, as z_target − logsumexp(z), `chunk`
    rows at a time. hidden (N, H), targets (N,) -> (N,).

    For a plain float32 Linear without softcapping, 1/τ is folded into the hidden states (H
    multiplies instead of V) and the (chunk, V) logits reuse one buffer (a fresh block per chunk
    costs page faults on CPU)."""
    n = hidden.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=hidden.device)
    linear = type(lm_head) is torch.nn.Linear and lm_head.weight.dtype == torch.float32
    fold = linear and not softcap
    if fold:
        hidden = hidden / temperature
    buffer = None
    for start in range(0, n, chunk):
        rows = hidden[start : start + chunk]
        if linear:
            if buffer is None:
                buffer = rows.new_empty((min(chunk, n), lm_head.weight.shape[0]))
            logits = torch.mm(rows, lm_head.weight.t(), out=buffer[: len(rows)])  # (chunk, V)
            if lm_head.bias is not None:
                logits.add_(lm_head.bias, alpha=1 / temperature if fold else 1.0)
        else:
            logits = lm_head(rows).float()  # (chunk, V)
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        if not fold:
            logits = logits / temperature
        picked = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
        out[start : start + chunk] = picked - torch.logsumexp(logits, dim=-1)
    return out


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the prefix all rows share, leaving every row at least one token of its own."""
    first, n = rows[0], min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != first[k] for r in rows):
            return k
    return max(n, 0)


def prefix_clusters(
    rows: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Split row indices into clusters that share a prefix, choosing the split that skips the
    most prefix tokens: ([(indices, shared length)], indices of rows run alone).

    Rows sorted lexicographically put rows with long common prefixes next to each other; a
    cluster is a run of them (dynamic programming over the cut points, O(B²) steps)."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    b = len(order)
    # neighbour[k]: prefix shared by sorted rows k and k+1; a run shares the minimum of its
    # neighbours', capped so every row keeps one token of its own
    neighbour = [common_prefix([rows[order[k]], rows[order[k + 1]]]) for k in range(b - 1)]
    best = [0] * (b + 1)  # best[j]: prefix tokens skipped over the first j sorted rows
    cut: list[tuple[int, int]] = [(0, 0)] * (b + 1)  # (start of the last run, its shared length)
    for j in range(1, b + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)  # row j-1 alone
        shared = len(rows[order[j - 1]]) - 1
        for i in range(j - 2, -1, -1):
            shared = min(shared, neighbour[i], len(rows[order[i]]) - 1)
            if shared < min_shared:
                break  # a longer run only shares less
            if best[i] + (j - i - 1) * shared > best[j]:
                best[j], cut[j] = best[i] + (j - i - 1) * shared, (i, shared)
    clusters, alone, j = [], [], b
    while j > 0:
        i, shared = cut[j]
        if shared:
            clusters.append((order[i:j], shared))
        else:
            alone.append(order[j - 1])
        j = i if shared else j - 1
    return clusters[::-1], sorted(alone)


def length_buckets(indices: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
    """Indices sorted by length and cut where a row is more than PAD_SLACK longer than the
    shortest of its bucket, so a padded batch is mostly real tokens."""
    buckets: list[list[int]] = []
    for i in sorted(indices, key=lambda k: lengths[k]):
        if buckets and lengths[i] <= (1 + PAD_SLACK) * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _padded(rows: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)


def _states_before(states: torch.Tensor, positions: Sequence[int], offset: int) -> torch.Tensor:
    """Hidden states of one row (T, H) that predict the tokens at `positions` (state p-1),
    where the row's states start at position `offset`."""
    index = torch.tensor(positions, dtype=torch.long, device=states.device) - 1 - offset
    return states.index_select(0, index)


def _run_alone(decoder, rows, wanted, indices, pad_id, device, picked: dict) -> None:
    """Plain forwards (no cache) of the rows in `indices`, one per length bucket."""
    for bucket in length_buckets(indices, [len(r) for r in rows]):
        ids = _padded([rows[i] for i in bucket], pad_id, device)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # (b, T, H)
        for k, i in enumerate(bucket):
            picked[i] = _states_before(hidden[k], wanted[i], 0)


def _run_cluster(decoder, rows, wanted, indices, shared, pad_id, device, picked: dict) -> None:
    """The shared prefix once (batch 1, KV cache kept), then the suffixes, one forward per
    length bucket, each over a copy of the prefix cache repeated to the bucket's size."""
    prefix_ids = torch.tensor([list(rows[indices[0]][:shared])], device=device)
    head = decoder(input_ids=prefix_ids, use_cache=True)
    prefix_states = head.last_hidden_state[0]  # (shared, H)
    buckets = length_buckets(indices, [len(r) - shared for r in rows])  # padding: suffixes
    for n, bucket in enumerate(buckets):
        # the suffix forward appends to the cache it is given: the last bucket may take it
        cache = (
            head.past_key_values if n == len(buckets) - 1 else copy.deepcopy(head.past_key_values)
        )
        cache.batch_repeat_interleave(len(bucket))
        ids = _padded([rows[i][shared:] for i in bucket], pad_id, device)
        hidden = decoder(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
        for k, i in enumerate(bucket):
            early = [p for p in wanted[i] if p - 1 < shared]  # predicted from the prefix
            late = wanted[i][len(early) :]
            picked[i] = torch.cat(
                [_states_before(prefix_states, early, 0), _states_before(hidden[k], late, shared)]
            )


def gather_logprobs(
    model,
    rows: Sequence[Sequence[int]],
    wanted: Sequence[Sequence[int]],
    pad_id: int,
    *,
    temperature: float,
    chunk: int,
    share_prefix: bool = True,
) -> torch.Tensor:
    """log π(x_p | x_<p) at the wanted positions of each row (ascending, each ≥ 1): one flat
    float32 tensor, row after row, (Σ len(wanted),)."""
    device, decoder = next(model.parameters()).device, model.get_decoder()
    inputs = [r[: max(w)] if w else [] for r, w in zip(rows, wanted, strict=True)]
    live = [i for i, w in enumerate(wanted) if w]
    picked: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        if share_prefix:
            clusters, alone = prefix_clusters([inputs[i] for i in live])
            clusters = [([live[k] for k in idx], shared) for idx, shared in clusters]
            alone = [live[k] for k in alone]
        else:
            clusters, alone = [], live
        for indices, shared in clusters:
            _run_cluster(decoder, inputs, wanted, indices, shared, pad_id, device, picked)
        if alone:
            _run_alone(decoder, inputs, wanted, alone, pad_id, device, picked)
        if not live:
            return torch.zeros(0, device=device)
        hidden = torch.cat([picked[i] for i in live])  # (N, H)
        targets = torch.tensor(
            [rows[i][p] for i in live for p in wanted[i]], dtype=torch.long, device=device
        )
        cap = getattr(model.config, "final_logit_softcapping", None)
        return target_logprobs(
            hidden, model.get_output_embeddings(), targets, temperature, chunk, cap
        )
