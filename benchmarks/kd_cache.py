"""Benchmark: the offline teacher cache on the real pair — bytes per token against accuracy.

    python benchmarks/kd_cache.py                        # >= 2,000 target tokens, fp32 on CPU
    python benchmarks/kd_cache.py --tokens 600 --ks 32,64 --grad rt-delta-q8:64,profile:64

Teacher qwen2.5-coder-1.5b-instruct, student qwen2.5-coder-0.5b-instruct (offline kit). Records:
reasoning-gym gsm_symbolic questions with their reference worked solutions as targets (the longest
of a pool, so prompts cost less), the step_by_step system prompt, built by `build_example` as every
trainer builds them.

1. The teacher runs once (the stage's own `target_hidden`/`target_logits`); its dense logits at the
   target positions are kept (and saved under --work, so a rerun skips the teacher).
2. For each k and encoding, a cache is written with `CacheWriter`, opened with `open_cache` (full
   verify) and read back record by record. bytes/token = files on disk (headers, index and
   meta.json included) / target tokens.
3. The student, LoRA r=16 on every linear layer of all 24 blocks at its initialisation (B = 0, so
   the gradient lives in B: a random projection, by A, of the full weight gradient), runs one
   forward per record. Forward KL at each T of --temperatures (default 1,2) against the dense
   teacher and against each cache (the losses library's sparse path, tail="bucket"), summed over
   target tokens. At T != 1 the schemes are: `enc:k` cached at T; `rt-enc:k` cached at T = 1 with
   tail_temperatures=[T], read re-tempered; `profile:k`, the T = 1 top k re-tempered with the
   tail's softened mass spread by a context-free profile (measured as dense logits, not a format):
   kl_rel_err = |KL_cached − KL_dense| / KL_dense. For the encodings in --grad, the gradient of
   that loss w.r.t. the LoRA weights, accumulated over all records: grad_cosine = cos(∇cached,
   ∇dense). A cache that decodes to the same (id, log-prob) pairs as another, log-probs within
   1e-6 (u32, packed and delta ids are all exact), reuses its accuracy figures: checked, not
   assumed.

Ends with `RESULT tokens=… t1_bytes_per_token=… t1_grad_cosine=… t1_kl_rel_err=… t2_…` for the
shipped default (`TeacherCacheConfig()`'s k and encoding; at T = 2 re-tempered from T = 1).
Bars (issue 20): T = 1 grad_cosine >= 0.999 at <= 64 bytes/token, T = 2 >= 0.99 at <= 128.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

TEACHER = "qwen2.5-coder-1.5b-instruct"
STUDENT = "qwen2.5-coder-0.5b-instruct"


def build_examples(tokenizer, min_tokens: int, pool: int, max_seq_len: int):
    """(record id, Example) for the gsm_symbolic records with the longest solutions, until they
    hold `min_tokens` target tokens."""
    from potstill.data import read_records
    from potstill.data.examples import build_example
    from potstill.prompts import load_prompt

    system = load_prompt("step_by_step")
    records = read_records(f"rg:gsm_symbolic?size={pool}&seed=1")
    records.sort(key=lambda r: -len(r["solution"]))
    out, tokens = [], 0
    for r in records:
        messages = (
            {"role": "system", "content": system},
            {"role": "user", "content": r["question"]},
        )
        ex = build_example(tokenizer, messages, r["solution"], max_seq_len)
        if ex is None:
            continue
        out.append((r["id"], ex))
        tokens += ex.target_tokens
        if tokens >= min_tokens:
            return out
    raise SystemExit(f"only {tokens} target tokens in a pool of {pool}; raise --pool")


def teacher_logits(examples, work: Path, batch_size: int = 4) -> list[torch.Tensor]:
    """Dense teacher logits (n_i, V) float32 per record, at its target positions."""
    from safetensors.torch import load_file, save_file

    from potstill.data.examples import collate
    from potstill.models import load_model
    from potstill.teacher.topk import target_hidden
    from potstill.teacher.topk import target_logits as lm_head

    key = hashlib.sha256(
        json.dumps([TEACHER, [(rid, ex.input_ids) for rid, ex in examples]]).encode()
    ).hexdigest()[:16]
    saved = work / f"teacher-logits-{key}.safetensors"
    if saved.is_file():
        tensors = load_file(saved)
        return [tensors[str(i)] for i in range(len(examples))]
    model = load_model(TEACHER, dtype="float32", device="cpu").eval()
    out = []
    start = time.perf_counter()
    with torch.no_grad():  # not inference_mode: these logits later meet autograd
        for i in range(0, len(examples), batch_size):
            part = [ex for _, ex in examples[i : i + batch_size]]
            hidden, rows = target_hidden(model, collate(part, 0))
            logits = lm_head(model, hidden)
            out += [t.clone() for t in logits.split(rows)]
    print(f"teacher: {sum(len(ex.input_ids) for _, ex in examples):,} tokens forward in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    save_file({str(i): t.contiguous() for i, t in enumerate(out)}, saved)
    del model
    return out


def write_variant(
    path: Path, examples, logits, k, encoding, fingerprint, temperature, read_at=None
):
    """Write, open (verify) and read back one cache; returns (cache rows, stats). With
    `read_at`, the cache is written at T = 1 with tail_temperatures=[read_at] and read
    re-tempered at it."""
    from potstill.teacher.cache import CacheWriter, open_cache
    from potstill.teacher.topk import tail_lse, top_k_rows

    meta = {
        "teacher": TEACHER,
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": logits[0].shape[-1],
        "k": k,
        "temperature": 1.0 if read_at else temperature,
        "tail_temperatures": [read_at] if read_at else [],
        "encoding": encoding,
    }
    with CacheWriter(path, meta) as writer:
        for (rid, _), z in zip(examples, logits, strict=True):
            ids, log_probs, log_tail = top_k_rows(z, k, meta["temperature"])
            lse = tail_lse(z, ids, [read_at]) if read_at else None
            writer.write(rid, ids, log_probs, log_tail, lse)
    start = time.perf_counter()
    cache = open_cache(path, teacher=TEACHER, vocab_size=meta["vocab_size"])
    verify_s = time.perf_counter() - start
    start = time.perf_counter()
    rows = [cache.get(rid, read_at) for rid, _ in examples]
    read_s = time.perf_counter() - start
    stats = {
        "bytes_per_token": cache.nbytes / cache.tokens,
        "read_ms_per_record": 1e3 * read_s / len(examples),
        "verify_s": verify_s,
    }
    return rows, stats


def profile_rows(logits, k: int, temperature: float) -> list:
    """The candidate "profile" tail, as dense teacher logits: the T = 1 top k re-tempered, the
    tail's exact softened mass spread over the ids outside the top k in proportion to
    exp(b / T), b the mean T = 1 log-prob of each id over all records (a context-free tail shape,
    one float16 per vocabulary id per cache). Not a cache format: it measures the scheme."""
    from potstill.losses import TeacherLogits

    profile = torch.cat([torch.log_softmax(z, -1) for z in logits]).mean(0) / temperature
    out = []
    for z in logits:
        log_p = torch.log_softmax(z / temperature, -1)
        ids = torch.log_softmax(z, -1).topk(k, -1).indices
        top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(-1, ids, True)
        log_tail = log_p.masked_fill(top, float("-inf")).logsumexp(-1, keepdim=True)
        shape = profile.expand_as(log_p).masked_fill(top, float("-inf"))
        shape = shape - shape.logsumexp(-1, keepdim=True) + log_tail
        out.append(TeacherLogits(temperature * torch.where(top, log_p, shape)))  # kd_loss / T
    return out


def same_rows(rows, other_rows, atol: float = 1e-6) -> bool:
    """Whether two caches decode to the same (id, log-prob) pairs per row (the losses do not
    depend on the order of the k entries), log-probs within `atol`."""

    def by_id(top):
        order = top.ids.argsort(-1)
        return top.ids.gather(-1, order), top.log_probs.gather(-1, order)

    for a, b in zip(rows, other_rows, strict=True):
        if not hasattr(a, "ids") or not hasattr(b, "ids"):
            return False
        if a.ids.shape != b.ids.shape:
            return False
        (ia, la), (ib, lb) = by_id(a), by_id(b)
        if not (torch.equal(ia, ib) and torch.allclose(la, lb, rtol=0, atol=atol)):
            return False
    return True


def student_pass(examples, logits, variants: dict, grad_names: set[str], temperature: float):
    """KL sums for the dense teacher and every variant; LoRA gradients for the dense teacher and
    the variants in `grad_names`."""
    from potstill.config.sections import LoraConfig
    from potstill.data.examples import collate
    from potstill.losses import TeacherLogits, kd_loss
    from potstill.models import apply_lora, load_model
    from potstill.teacher.topk import target_hidden
    from potstill.teacher.topk import target_logits as lm_head

    model = load_model(STUDENT, dtype="float32", device="cpu")
    torch.manual_seed(0)
    model = apply_lora(model, LoraConfig(r=16, alpha=32, dropout=0.0)).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(ex.target_tokens for _, ex in examples)
    kl = {name: 0.0 for name in ["dense", *variants]}
    grads = {name: [torch.zeros_like(p) for p in params] for name in ["dense", *grad_names]}
    start = time.perf_counter()
    for i, (_, ex) in enumerate(examples):
        batch = collate([ex], 0)
        hidden, _ = target_hidden(model, batch)
        z = lm_head(model, hidden)  # (n, V) with the graph back to the LoRA weights
        labels = batch["labels"][0, 1:][batch["labels"][0, 1:] != -100]
        teachers = {"dense": TeacherLogits(logits[i])}
        teachers.update({name: rows[i] for name, rows in variants.items()})
        for name, teacher in teachers.items():
            with torch.set_grad_enabled(name in grads):
                out = kd_loss(
                    z if name in grads else z.detach(),
                    labels,
                    teacher,
                    kd_ratio=1.0,
                    temperature=temperature,
                    tail="bucket",
                    num_target_tokens=total,
                )
            kl[name] += out.soft_sum
            if name in grads:
                step = torch.autograd.grad(out.loss, params, retain_graph=True)
                for acc, g in zip(grads[name], step, strict=True):
                    acc += g
        print(f"  student record {i + 1}/{len(examples)} ({time.perf_counter() - start:.0f} s)",
              flush=True)  # fmt: skip
    flat = {name: torch.cat([g.flatten() for g in gs]).double() for name, gs in grads.items()}
    cosine = {
        name: float(torch.nn.functional.cosine_similarity(flat[name], flat["dense"], dim=0))
        for name in flat
    }
    return kl, cosine


def measure(args, examples, logits, fingerprint, temperature, default) -> list[dict]:
    """One table's rows at `temperature`: every (encoding, k) cached at it; at T != 1 also the
    T = 1 caches re-tempered to it (rt-) and the profile tail."""
    ks = sorted({int(k) for k in args.ks.split(",")} | {default.k})
    encodings = list(dict.fromkeys([*args.encodings.split(","), default.encoding]))
    grid = [(e, k) for k in ks for e in encodings]
    if temperature != 1.0:
        grid += [(f"rt-{e}", k) for k in ks for e in encodings]
    variants, stats, same_as = {}, {}, {}
    root = args.work / "caches"
    shutil.rmtree(root, ignore_errors=True)
    for encoding, k in grid:
        name, rt = f"{encoding}:{k}", encoding.startswith("rt-")
        rows, stats[name] = write_variant(
            root / name, examples, logits, k, encoding.removeprefix("rt-"), fingerprint,
            temperature, read_at=temperature if rt else None,
        )  # fmt: skip
        twin = next((o for o, o_rows in variants.items() if same_rows(rows, o_rows)), None)
        if twin is None:
            variants[name] = rows
        else:
            same_as[name] = twin
    shutil.rmtree(root, ignore_errors=True)
    tokens = sum(ex.target_tokens for _, ex in examples)
    if temperature != 1.0:  # the profile: rt-delta-q8's records + one float16 per id per cache
        for k in ks:
            variants[f"profile:{k}"] = profile_rows(logits, k, temperature)
            base = stats[f"rt-delta-q8:{k}"]["bytes_per_token"]
            stats[f"profile:{k}"] = {"bytes_per_token": base, "read_ms_per_record": math.nan}
            grid.append(("profile", k))
    grad_names = {same_as.get(n, n) for n in args.grad.split(",")}
    grad_names.add(f"{default.encoding}:{default.k}")
    grad_names &= set(variants)
    kl, cosine = student_pass(examples, logits, variants, grad_names, temperature)
    print(f"\nT={temperature}: dense teacher forward KL {kl['dense'] / tokens:.4f} nats/token")
    out = []
    for encoding, k in grid:
        name = f"{encoding}:{k}"
        src = same_as.get(name, name)
        out.append({
            "T": temperature, "encoding": encoding, "k": k, **stats[name],
            "kl_rel_err": abs(kl[src] - kl["dense"]) / kl["dense"], "grad_cos": cosine.get(src),
        })  # fmt: skip
    return out


def print_table(rows: list[dict], profile_bytes: float) -> None:
    header = f"{'T':>3} {'k':>4} {'scheme':<14} {'bytes/tok':>9} {'kl_rel_err':>10} {'grad_cos':>9}"
    print(header + f" {'read ms/rec':>11}")
    print("-" * (len(header) + 12))
    for r in rows:
        cos = f"{r['grad_cos']:.5f}" if r["grad_cos"] is not None else "-"
        extra = f"  (+{profile_bytes:.1f} profile here)" if r["encoding"] == "profile" else ""
        print(f"{r['T']:>3g} {r['k']:>4} {r['encoding']:<14} {r['bytes_per_token']:>9.1f} "
              f"{r['kl_rel_err']:>10.5f} {cos:>9} "
              f"{r['read_ms_per_record']:>11.3f}{extra}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="target tokens, at least")
    parser.add_argument("--pool", type=int, default=80, help="gsm_symbolic records to pick from")
    parser.add_argument("--ks", default="16,32,64")
    parser.add_argument("--encodings", default="delta-q8,packed-f32")
    parser.add_argument(
        "--grad",
        default="delta-q8:16,delta-q8:32,rt-delta-q8:32,rt-delta-q8:64,profile:32,profile:64",
        help="scheme:k pairs whose student gradient is measured (each costs one backward)",
    )
    parser.add_argument("--temperatures", default="1,2", help="of cache and loss")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kd_cache")
    args = parser.parse_args()

    from potstill.models import check_same_vocab, load_tokenizer
    from potstill.stages.teacher_cache import TeacherCacheConfig
    from potstill.teacher.cache import tokenizer_fingerprint

    default = TeacherCacheConfig()
    tokenizer = load_tokenizer(TEACHER)
    check_same_vocab(tokenizer, load_tokenizer(STUDENT))
    examples = build_examples(tokenizer, args.tokens, args.pool, default.max_seq_len)
    tokens = sum(ex.target_tokens for _, ex in examples)
    print(f"{len(examples)} records, {tokens:,} target tokens, "
          f"{sum(len(ex.input_ids) for _, ex in examples):,} tokens in all")  # fmt: skip
    logits = teacher_logits(examples, args.work)
    fingerprint = tokenizer_fingerprint(tokenizer)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    rows = [
        r for t in temperatures for r in measure(args, examples, logits, fingerprint, t, default)
    ]
    vocab = logits[0].shape[-1]
    print(f"\ndense fp32 rows would take {4 * vocab:,} bytes/token; the profile is {2 * vocab:,} "
          f"bytes a cache ({2 * vocab / tokens:.1f} bytes/token over these "
          f"{tokens} tokens)")  # fmt: skip
    print_table(rows, 2 * vocab / tokens)
    print(f"\ndefault: k={default.k} {default.encoding}; T != 1 re-tempered from T = 1 (rt-)")
    result = []
    for r in rows:
        want = default.encoding if r["T"] == 1.0 else f"rt-{default.encoding}"
        if r["encoding"] == want and r["k"] == default.k:
            t = f"t{r['T']:g}"
            cos, rel = r["grad_cos"], r["kl_rel_err"]
            result.append(f"{t}_bytes_per_token={r['bytes_per_token']:.1f} "
                          f"{t}_grad_cosine={cos:.5f} {t}_kl_rel_err={rel:.4f}")  # fmt: skip
    print(f"RESULT tokens={tokens} " + " ".join(result))


if __name__ == "__main__":
    main()
