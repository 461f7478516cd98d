"""The offline teacher of `potstill distill`: a cache from `potstill teacher cache`, checked up
front against this run (teacher, tokenizer, vocabulary, data settings, every record's positions,
temperature, finite log-probs), and its rows for a micro-batch.

The cache was built with the teacher's tokenizer. A student of the same family may carry a chat
template that differs in parts these records never use (Qwen2.5-Coder 0.5B and 1.5B differ in the
tool-call text): then every record is tokenised with both, and training goes on only if the two
agree token for token, so cached positions line up exactly.
"""

from __future__ import annotations

import hashlib

from potstill.errors import ConfigError, DataError
from potstill.losses import TeacherTopK
from potstill.losses.reduce import IGNORE_INDEX
from potstill.prompts import load_prompt


def predicted_targets(example) -> int:
    """Target tokens a model predicts (t >= 1 with a label): the cache's rows for a record."""
    return sum(label != IGNORE_INDEX for label in example.labels[1:])


def cache_rows(cache, item, temperature: float | None = None) -> TeacherTopK:
    """The cached top-k rows of this item's predicted target tokens, in order, at `temperature`
    (None: the cache's; `open_teacher_cache` checked there are enough rows and that the cache
    reads at it). A max_seq_len shorter than the cache's takes a prefix of them."""
    top = cache.get(item.record_id, temperature)
    n = predicted_targets(item.example)
    return TeacherTopK(top.ids[:n], top.log_probs[:n])


def _data_meta(meta: dict) -> str:
    keys = ("prompt_field", "target_field", "system_prompt", "max_seq_len")
    return ", ".join(f"{k}={meta[k]!r}" for k in keys if k in meta)


def check_tokenizer(cfg, cache, tokenizer, items, rebuild) -> None:
    """The student's tokenizer is the cache's, or builds every record identically to it.
    `rebuild(teacher_tokenizer)` returns the items built with the teacher's tokenizer."""
    from potstill.models import check_same_vocab, load_tokenizer
    from potstill.teacher.cache import tokenizer_fingerprint

    cached = cache.meta["tokenizer_fingerprint"]
    if tokenizer_fingerprint(tokenizer) == cached:
        return
    spec = cfg.teacher.model
    teacher_tokenizer = load_tokenizer(spec.name, trust_remote_code=spec.trust_remote_code)
    if tokenizer_fingerprint(teacher_tokenizer) != cached:
        raise DataError(
            f"{cfg.teacher.cache}: cache made with another tokenizer (fingerprint {cached[:12]}, "
            f"student {tokenizer_fingerprint(tokenizer)[:12]}, teacher "
            f"{tokenizer_fingerprint(teacher_tokenizer)[:12]}): its token ids would not line up; "
            "rebuild the cache with this teacher"
        )
    check_same_vocab(teacher_tokenizer, tokenizer)
    theirs = {item.record_id: item.example for item in rebuild(teacher_tokenizer)}
    for ours in items:
        other = theirs.get(ours.record_id)
        if other is None or (other.input_ids, other.labels) != (
            ours.example.input_ids,
            ours.example.labels,
        ):
            raise DataError(
                f"{cfg.teacher.cache}: record '{ours.record_id}' tokenises differently with the "
                "student's chat template than with the teacher's the cache was built with; "
                "give the student the teacher's chat template or train online"
            )


def check_teacher_tokenizer(cfg, cache, teacher_tokenizer) -> None:
    """Across vocabularies: the teacher's tokenizer (whose vocabulary strings the hybrid loss
    matches with the student's) is the one the cache's ids are in."""
    from potstill.teacher.cache import tokenizer_fingerprint

    cached, found = cache.meta["tokenizer_fingerprint"], tokenizer_fingerprint(teacher_tokenizer)
    if found != cached:
        raise DataError(
            f"{cfg.teacher.cache}: cache made with another tokenizer (fingerprint {cached[:12]}) "
            f"than teacher.model.name={cfg.teacher.model.name}'s ({found[:12]}): its ids would "
            "not be that vocabulary's; name the cache's teacher or rebuild the cache"
        )


def open_teacher_cache(
    cfg, tokenizer, vocab_size: int, items: list, rebuild, *, teacher_tokenizer=None
):  # fmt: skip
    """The offline cache, checked against this run; the first missing record is named.
    `teacher_tokenizer` (loss.cross_tokenizer): the student has another vocabulary, its rows
    are paired by spans (`train.cross_tokenizer_cache`), not one for one."""
    from potstill.teacher.cache import open_cache

    path = cfg.teacher.cache
    cross = teacher_tokenizer is not None
    cache = open_cache(
        path, teacher=cfg.teacher.model.name, vocab_size=None if cross else vocab_size
    )
    if cross:
        check_teacher_tokenizer(cfg, cache, teacher_tokenizer)
    else:
        check_tokenizer(cfg, cache, tokenizer, items, rebuild)
    missing = next((item.record_id for item in items if item.record_id not in cache), None)
    if missing is not None:
        raise DataError(
            f"{path}: no entry for record '{missing}'; the cache was made from other records "
            f"than {cfg.data.source}: run `potstill teacher cache` on them"
        )
    system = load_prompt(cfg.data.system_prompt) if cfg.data.system_prompt else None
    ours = {
        "prompt_field": cfg.data.prompt_field,
        "target_field": cfg.data.target_field,
        "system_prompt_sha256": hashlib.sha256(system.encode()).hexdigest() if system else None,
    }
    changed = [k for k, v in ours.items() if k in cache.meta and cache.meta[k] != v]
    if changed:
        names = ", ".join("system_prompt" if k.startswith("system") else k for k in changed)
        raise ConfigError(
            f"{path}: cache built with other data.{names} ({_data_meta(cache.meta)}); its "
            "positions would not line up: use the cache's settings or cache again"
        )
    short = None if cross else next(
        (i for i in items if cache.num_tokens(i.record_id) < predicted_targets(i.example)), None
    )  # fmt: skip
    if short is not None:
        raise DataError(
            f"{path}: record '{short.record_id}' has {cache.num_tokens(short.record_id)} cached "
            f"positions but {predicted_targets(short.example)} target tokens here: the cache was "
            f"made with another system prompt, fields or max_seq_len (cache: "
            f"{_data_meta(cache.meta)}); make it with this config's data settings"
        )
    readable = cache.temperatures()
    if cfg.loss.temperature not in readable:
        raise ConfigError(
            f"loss.temperature={cfg.loss.temperature} but the cache reads at temperature "
            f"{' or '.join(map(str, readable))}; set loss.temperature={readable[0]} or cache "
            f"again at temperature 1 with tail_temperatures=[{cfg.loss.temperature}]"
        )
    return cache
