"""Soft losses between a teacher and a student whose vocabularies differ, per aligned position.

The positions are paired beforehand (`potstill.data.alignment.target_positions`); here row i of
the student's logits and row i of the teacher's are two distributions over *different* token
sets, conditioned on the same text. Two losses, both per token like `potstill.losses.divergences`
(T² is not applied here: `potstill.losses.weighting.mix` does it once):

- `uld`: Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss", arXiv 2402.12030). Token identities are
  dropped: both probability vectors are sorted in decreasing order, the shorter one is padded with
  zeros, and the loss is the L1 distance Σ_i |p_(i) − q_(i)|, i.e. the student is asked to be as
  sure as the teacher, in the same shape of distribution, whatever its tokens are called.
- `hybrid`: tokens spelled the same in both vocabularies (`vocab_matches`) are compared token by
  token with any same-vocabulary divergence of `potstill.losses.registry`; only the rest of the
  mass goes through ULD. TRL ships a loss of this kind as GOLD; the formula is in `hybrid`.

Both run over chunks of rows: one chunk's logits are upcast to float32, softened, sorted and
reduced to one value per row before the next chunk is touched, and under autograd each chunk is
recomputed in backward (activation checkpointing), so at most one chunk's float32 [c, V]
intermediates (and the int64 sort indices ULD's backward needs) exist at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from potstill.losses.chunked import default_chunk_size
from potstill.losses.divergences import check_finite, check_temperature, upcast
from potstill.losses.registry import resolve

Tensor = torch.Tensor


@dataclass(frozen=True)
class VocabMatch:
    """Token ids spelled identically in both vocabularies: teacher_ids[i] ↔ student_ids[i]."""

    teacher_ids: Tensor
    """(M,) int64, increasing"""
    student_ids: Tensor
    """(M,) int64, no id twice"""

    def __len__(self) -> int:
        return int(self.teacher_ids.numel())


def vocab_matches(teacher_vocab: Mapping[str, int], student_vocab: Mapping[str, int]) -> VocabMatch:
    """The exact-string index map between two vocabularies ({token string: id}, as
    `tokenizer.get_vocab()` gives them). Each id is used at most once on each side, so the map is
    one to one; where a vocabulary spells one id two ways the lowest teacher id wins.

    Strings are compared as stored: two byte-level BPE vocabularies (Qwen, SmolLM2, both "Ġ" for
    a space) match on many tokens; a SentencePiece one ("▁") shares few strings with them, and
    across conventions a non-ASCII string may match by accident (byte-level "Ã©" is "é").
    """
    pairs = sorted(
        (teacher_id, student_vocab[token])
        for token, teacher_id in teacher_vocab.items()
        if token in student_vocab
    )
    teacher_ids, student_ids, seen_t, seen_s = [], [], set(), set()
    for teacher_id, student_id in pairs:
        if teacher_id in seen_t or student_id in seen_s:
            continue
        seen_t.add(teacher_id)
        seen_s.add(student_id)
        teacher_ids.append(teacher_id)
        student_ids.append(student_id)
    return VocabMatch(
        torch.tensor(teacher_ids, dtype=torch.long), torch.tensor(student_ids, dtype=torch.long)
    )


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (the full sort), got {top_k!r}")


def _sorted_head(probs: Tensor, width: int) -> Tensor:
    """The `width` largest entries of each row, in decreasing order, zero-padded if the row is
    shorter. (n, V) -> (n, width)"""
    vocab = probs.shape[-1]
    if width >= vocab:
        ordered = probs.sort(dim=-1, descending=True).values
        return F.pad(ordered, (0, width - vocab))
    return probs.topk(width, dim=-1, sorted=True).values


def uld_core(q: Tensor, p: Tensor, top_k: int | None = None) -> Tensor:
    """ULD on probabilities: Σ_i |p_(i) − q_(i)| over the sorted, zero-padded vectors.
    q (n, V_s), p (n, V_t) -> (n,).

    With `top_k` the k largest of each side are compared one by one and the mass past rank k
    as one number, |P_tail − Q_tail|: a lower bound of the full value (triangle inequality),
    exact when either side has no mass past rank k, as a top-k teacher cache with k ≤ top_k
    has (then the full sum's tail is Σ_{i>k} q_(i) = Q_tail). A top-k instead of a full sort."""
    longest = max(q.shape[-1], p.shape[-1])
    width = longest if top_k is None else min(top_k, longest)
    if width == 0:
        return q.new_zeros(q.shape[:-1])
    head_p, head_q = _sorted_head(p, width), _sorted_head(q, width)
    loss = (head_p - head_q).abs().sum(-1)
    if width < longest:
        tail_p, tail_q = p.sum(-1) - head_p.sum(-1), q.sum(-1) - head_q.sum(-1)
        loss = loss + (tail_p - tail_q).abs()
    return loss


def _uld_rows(student_logits: Tensor, teacher_logits: Tensor, temperature, top_k) -> Tensor:
    q = F.softmax(upcast(student_logits) / temperature, dim=-1)
    p = F.softmax(upcast(teacher_logits) / temperature, dim=-1)
    return uld_core(q, p, top_k)


def _unmatched(vocab: int, matched_ids: Tensor) -> Tensor:
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[matched_ids] = False
    return keep.nonzero().squeeze(-1)


def _hybrid_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature,
    top_k,
    index,
    core,
    matched_weight,
    unmatched_weight,
) -> Tensor:
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(upcast(teacher_logits) / temperature, dim=-1)
    t_matched, s_matched, t_rest, s_rest = (i.to(log_p.device) for i in index)
    loss = log_q.new_zeros(log_q.shape[:-1])
    if matched_weight and t_matched.numel():
        log_p_m, log_q_m = log_p[:, t_matched], log_q[:, s_matched]
        # renormalised over the matched tokens: a distribution the registry's cores accept
        log_p_m = log_p_m - log_p_m.logsumexp(-1, keepdim=True)
        log_q_m = log_q_m - log_q_m.logsumexp(-1, keepdim=True)
        loss = loss + matched_weight * core(log_q_m, log_p_m)
    if unmatched_weight:
        rest = uld_core(log_q[:, s_rest].exp(), log_p[:, t_rest].exp(), top_k)
        loss = loss + unmatched_weight * rest
    return loss


def _over_chunks(rows_fn, student_logits: Tensor, teacher_logits: Tensor, chunk_size) -> Tensor:
    """rows_fn over row chunks of the flattened pair; (..., V_s), (..., V_t) -> (...)."""
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must pair position for position (all but the last "
            "dim equal); gather both at the aligned positions first (target_positions)"
        )
    student = student_logits.reshape(-1, student_logits.shape[-1])
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])  # a target only
    rows = student.shape[0]
    if chunk_size is None:
        # a chunk's full sort holds ~5 float32-sized copies of it (upcast, softmax, sorted
        # values, int64 indices): a quarter of the fused loss's rows keeps the same budget
        chunk_size = max(1, default_chunk_size(max(student.shape[-1], teacher.shape[-1])) // 4)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    # recompute chunks in backward only when there is more than one: that is what bounds memory
    recompute = torch.is_grad_enabled() and student.requires_grad and rows > chunk_size
    values = []
    for start in range(0, rows, chunk_size):
        s_chunk, t_chunk = student[start : start + chunk_size], teacher[start : start + chunk_size]
        check_finite(t_chunk, "teacher logits", start)
        if recompute:
            values.append(checkpoint(rows_fn, s_chunk, t_chunk, use_reentrant=False))
        else:
            values.append(rows_fn(s_chunk, t_chunk))
    if not values:
        return student.new_zeros(lead, dtype=torch.float32)
    return torch.cat(values).reshape(lead)


def uld(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Universal Logit Distillation loss per aligned position (Boizard et al. 2024).
    (..., V_s), (..., V_t) -> (...), float32.

    With q = softmax(student_logits / T), p = softmax(teacher_logits / T), both sorted
    decreasingly and the shorter zero-padded to max(V_s, V_t): Σ_i |p_(i) − q_(i)|, in [0, 2].
    `top_k` compares the k largest probabilities of each side one by one and the rest as one
    mass (`uld_core`): a top-k instead of a full sort of V entries, a lower bound of the full
    loss, exact when the teacher has no mass past rank k (a top-k cache with k ≤ top_k).
    `chunk_size` rows are processed at a time (None: a quarter of `default_chunk_size(max V)`,
    128 rows for a 152k vocabulary). The teacher's logits are detached.
    """
    check_temperature(temperature)
    _check_top_k(top_k)
    rows_fn = functools.partial(_uld_rows, temperature=temperature, top_k=top_k)
    return _over_chunks(rows_fn, student_logits, teacher_logits, chunk_size)


def _check_match(match: VocabMatch, student_vocab: int, teacher_vocab: int) -> None:
    if match.teacher_ids.shape != match.student_ids.shape or match.teacher_ids.dim() != 1:
        raise ValueError("VocabMatch needs two 1-d id tensors of one length; use vocab_matches")
    for name, ids, vocab in (
        ("teacher", match.teacher_ids, teacher_vocab),
        ("student", match.student_ids, student_vocab),
    ):
        if len(match) and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise ValueError(
                f"VocabMatch holds {name} ids outside the {name} logits' {vocab} entries; "
                "build it from the tokenizers of these two models"
            )


def _check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def hybrid(
    student_logits: Tensor,
    teacher_logits: Tensor,
    match: VocabMatch,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
    **params: float,
) -> Tensor:
    """Same-spelling tokens by a registry divergence, the rest by ULD, per aligned position.
    (..., V_s), (..., V_t), VocabMatch of M pairs -> (...), float32.

    With p = softmax(z_t / T) (V_t,), q = softmax(z_s / T) (V_s,) at one position, the matched
    ids t_1..t_M ↔ s_1..s_M and the rest U_t, U_s of each vocabulary:

        p̂_j = p[t_j] / Σ_i p[t_i],   q̂_j = q[s_j] / Σ_i q[s_i]          (M,) each
        loss = matched_weight · D(p̂ ‖ q̂) + unmatched_weight · ULD(p[U_t], q[U_s])

    D is the registry divergence `divergence` with `params` (forward_kl = KL(p̂ ‖ q̂), jsd(β),
    ...), on the renormalised distributions over the shared tokens, where comparing token by
    token means something. ULD (`uld_core`, optionally top-k) runs on the leftover probabilities
    as they are, not renormalised: the sorted masses of tokens that exist on one side only.
    With identical vocabularies and the identity match the second term is empty and the loss is
    exactly D(p ‖ q). This is our reading of the hybrid in TRL's GOLD trainer (matched tokens
    compared directly, unmatched ones by ULD, with the two weights); the renormalisation is our
    choice, so that D keeps its meaning and range.
    """
    check_temperature(temperature)
    _check_top_k(top_k)
    _check_weight("matched_weight", matched_weight)
    _check_weight("unmatched_weight", unmatched_weight)
    row, bound = resolve(divergence, params)
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    _check_match(match, student_vocab, teacher_vocab)
    index = (
        match.teacher_ids,
        match.student_ids,
        _unmatched(teacher_vocab, match.teacher_ids),
        _unmatched(student_vocab, match.student_ids),
    )
    rows_fn = functools.partial(
        _hybrid_rows,
        temperature=temperature,
        top_k=top_k,
        index=index,
        core=functools.partial(row.core, **bound),
        matched_weight=matched_weight,
        unmatched_weight=unmatched_weight,
    )
    return _over_chunks(rows_fn, student_logits, teacher_logits, chunk_size)
