"""RLT prompts, rewards and scoring on tiny random models (seconds, CPU, no network)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from potstill.config.sections import ModelConfig
from potstill.errors import ConfigError, DataError, ModelError
from potstill.rlt import (
    RewardConfig,
    RLTModels,
    RLTTags,
    Sample,
    build_student_text,
    build_teacher_text,
    make_rlt_reward,
    reward_batch,
    reward_per_sample,
    split_explanation,
    system_prompt,
    teacher_prefill,
    teacher_request,
)
from potstill.rlt.prompts import align_groups
from potstill.rlt.rewards import prepare
from potstill.rlt.score import score_records
from potstill.stages.rlt_score import RLTScoreConfig, run_score

from .conftest import build_model, build_tokenizer

TAGS = RLTTags()
QUESTION = "What is 17 + 25?"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def models(tok) -> RLTModels:
    """Teacher and student: two seeds, one vocabulary; no system prompt keeps contexts short."""
    teacher, student = build_model(tok, seed=1), build_model(tok, seed=2)
    return RLTModels(
        teacher, tok, student, tok, teacher_system_prompt=None, student_system_prompt=None
    )


def direct(model, tok, text: str, tau: float):
    """Float64 log π(x_p | x_<p) for every position p ≥ 1 (index p-1), and the encoding."""
    enc = tok(text, add_special_tokens=False)
    ids = torch.tensor([enc["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1] / tau, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return enc, lp


def span_tokens(enc, span: tuple[int, int]) -> list[int]:
    return sorted({enc.char_to_token(c) for c in range(*span)})


def direct_reward(models: RLTModels, sample: Sample, cfg: RewardConfig) -> dict:
    """The formulas of the paper, token by token in float64, for texts where the explanation
    tokenises alike in both contexts."""
    tau = cfg.temperature
    t_text = build_teacher_text(models.teacher_tokenizer, sample.question, sample.solution,
                                sample.explanation, closed=sample.closed)  # fmt: skip
    s_text = build_student_text(models.student_tokenizer, sample.question, sample.solution,
                                sample.explanation)  # fmt: skip
    t_enc, t_lp = direct(models.teacher, models.teacher_tokenizer, t_text.text, tau)
    s_enc, s_lp = direct(models.student, models.student_tokenizer, s_text.text, tau)
    t_expl = span_tokens(t_enc, t_text.explanation)
    s_expl = span_tokens(s_enc, s_text.explanation)
    s_sol = span_tokens(s_enc, s_text.solution)
    assert [t_enc["input_ids"][p] for p in t_expl] == [s_enc["input_ids"][p] for p in s_expl]
    sol = torch.stack([s_lp[p - 1] for p in s_sol])
    d = torch.stack([t_lp[p - 1] - s_lp[q - 1] for p, q in zip(t_expl, s_expl, strict=True)])
    r_ss = float(sol.mean() + cfg.alpha * sol.min())
    r_kl = float(d.mean() + cfg.alpha * d.max())
    reward = r_ss - cfg.lam * r_kl if sample.closed else cfg.missing_tag_reward
    return {"r_ss": r_ss, "r_kl": r_kl, "rlt_reward": reward, "sol": len(s_sol), "expl": len(d)}


def sample(k: int = 1, **kw) -> Sample:
    return Sample(QUESTION, kw.pop("solution", "17 + 25 = 42"),
                  kw.pop("explanation", "First add 17 and 25. " * k), id=f"r{k}", **kw)  # fmt: skip


# prompts


def test_texts_and_spans(tok):
    t = build_teacher_text(tok, QUESTION, "42", "Add them.", system="Teach.")
    s = build_student_text(tok, QUESTION, "42", "Add them.", system="Learn.")
    for text in (t, s):
        assert text.text[slice(*text.solution)] == "42"
        assert text.text[slice(*text.explanation)] == "Add them."
        assert not text.text.endswith("<|im_end|>\n")  # the assistant turn stays open
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": "Teach."}, {"role": "user", "content": QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prefill = teacher_prefill("42")
    assert prefill == "<|begin_of_solution|>42<|end_of_solution|>\n\n<|begin_of_explanation|>\n\n"
    assert t.text == prompt + prefill + "Add them.<|end_of_explanation|>"
    assert s.text.endswith(
        "<|begin_of_thought|>Add them.<|end_of_thought|>\n\n<|begin_of_solution|>42"
        "<|end_of_solution|>"
    )
    request = teacher_request("k", QUESTION, "42", system="Teach.", seed=3)
    assert request.prefill == prefill and request.messages[0]["content"] == "Teach."
    base = build_tokenizer()
    base.chat_template = None  # a base model: the plain format the hf backend prompts it with
    t = build_teacher_text(base, QUESTION, "42", "Add them.")
    assert t.text.startswith(f"Question: {QUESTION}\nAnswer:")
    assert t.text[slice(*t.explanation)] == "Add them."


def test_tags_configurable_and_prompts_filled():
    tags = RLTTags(explanation_start="<e>", explanation_end="</e>", thought_start="<t>",
                   thought_end="</t>")  # fmt: skip
    assert teacher_prefill("S", tags).endswith("<e>\n\n")
    teacher = system_prompt("rlt_teacher", tags)
    assert "<e>" in teacher and "</e>" in teacher and "{" not in teacher
    assert "<t>" in system_prompt("rlt_student", tags)
    with pytest.raises(ConfigError, match="distinct"):
        RLTTags(thought_start="<|begin_of_solution|>")


def test_split_explanation():
    assert split_explanation("Step one.<|end_of_explanation|> trailing") == ("Step one.", True)
    assert split_explanation("Step one, then the budget ran out") == (
        "Step one, then the budget ran out",
        False,
    )


# rewards against the formulas


def test_each_part_matches_direct_float64(models):
    cfg = RewardConfig()
    for k in (1, 3):
        (got,) = reward_per_sample(models, [sample(k)], cfg)
        want = direct_reward(models, sample(k), cfg)
        assert got.r_ss == pytest.approx(want["r_ss"], abs=1e-5)
        assert got.r_kl == pytest.approx(want["r_kl"], abs=1e-5)
        assert got.rlt_reward == pytest.approx(want["rlt_reward"], abs=1e-5)
        assert (got.solution_tokens, got.explanation_tokens) == (want["sol"], want["expl"])


def test_reductions_and_weights_configurable(models):
    base = direct_reward(models, sample(2), RewardConfig(alpha=0.0))
    (plain,) = reward_batch(models, [sample(2)], RewardConfig(alpha=0.0, lam=0.5))
    assert plain.rlt_reward == pytest.approx(base["r_ss"] - 0.5 * base["r_kl"], abs=1e-5)
    (summed,) = reward_batch(
        models, [sample(2)], RewardConfig(alpha=0.0, solution_reductions=["sum", "min"])
    )
    assert summed.r_ss == pytest.approx(base["r_ss"] * base["sol"], abs=1e-4)
    with pytest.raises(ConfigError, match="kl_reductions"):
        RewardConfig(kl_reductions=["mean", "median"])
    with pytest.raises(ConfigError, match="temperature"):
        RewardConfig(temperature=0)


def test_spans_select_solution_and_explanation_tokens_only(models, tok):
    (prep,) = prepare(models, [sample(2)], RewardConfig())
    decode = lambda ids, pos: tok.decode([ids[p] for p in pos])  # noqa: E731
    assert decode(prep.student_ids, prep.student_sol) == "17 + 25 = 42"
    assert decode(prep.student_ids, prep.student_expl) == sample(2).explanation
    assert decode(prep.teacher_ids, prep.teacher_expl) == sample(2).explanation
    # r^SS sees only solution tokens: the explanation changes the context, not the scored set
    short, long = reward_batch(models, [sample(1), sample(3)])
    assert short.solution_tokens == long.solution_tokens
    assert long.explanation_tokens > short.explanation_tokens


def test_temperature_scales_both_models(models):
    values = {}
    for tau in (0.7, 1.3):
        cfg = RewardConfig(temperature=tau)
        (got,) = reward_batch(models, [sample(2)], cfg)
        want = direct_reward(models, sample(2), cfg)
        assert got.r_ss == pytest.approx(want["r_ss"], abs=1e-5)
        assert got.r_kl == pytest.approx(want["r_kl"], abs=1e-5)
        values[tau] = got
    assert values[0.7].r_ss != pytest.approx(values[1.3].r_ss, abs=1e-4)
    assert values[0.7].r_kl != pytest.approx(values[1.3].r_kl, abs=1e-6)


def test_missing_closing_tag_gets_the_penalty(models):
    cfg = RewardConfig(missing_tag_reward=-2.5)
    (got,) = reward_batch(models, [sample(2, closed=False)], cfg)
    want = direct_reward(models, sample(2, closed=False), cfg)
    assert got.rlt_reward == -2.5 and not got.closed
    assert got.r_ss == pytest.approx(want["r_ss"], abs=1e-5)  # the parts are still reported
    reward = make_rlt_reward(models, cfg)
    out = reward(
        ["Add them.<|end_of_explanation|>", "Add them and then"],
        question=[QUESTION] * 2,
        solution=["42"] * 2,
    )
    assert out[1] == -2.5 and out[0] != -2.5


@pytest.mark.parametrize("group", [True, False], ids=["one-question", "mixed"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_batched_equals_per_sample(models, share_prefix, group, monkeypatch):
    from potstill.rlt import logprobs

    cfg = RewardConfig(share_prefix=share_prefix, logit_chunk=7, max_length=200)
    samples = [sample(k) for k in (1, 4, 2, 6)] + [sample(3, closed=False)]
    if not group:
        samples.append(Sample("What is 5 - 3 - 6?", "-4", "Subtract twice.", id="other"))
    samples.append(sample(30))  # longer than max_length: skipped, the rest still scored
    real, clusters = logprobs.prefix_clusters, []

    def spy(rows):
        clusters.append(real(rows))
        return clusters[-1]

    monkeypatch.setattr(logprobs, "prefix_clusters", spy)
    batched, single = reward_batch(models, samples, cfg), reward_per_sample(models, samples, cfg)
    # a GRPO group shares its prompt (and, for the teacher, the solution): run once, reused;
    # the other question's rows share only the chat template, run apart
    assert len(clusters) == (2 if share_prefix else 0)
    for found, alone in clusters:
        assert len(found) == 1 and len(alone) == (0 if group else 1)
        assert found[0][1] >= logprobs.MIN_SHARED_PREFIX
    assert batched[-1].skipped and "context_too_long" in batched[-1].skipped
    assert batched[-1].rlt_reward is None and single[-1].skipped == batched[-1].skipped
    for b, s in zip(batched[:-1], single[:-1], strict=True):
        for name in ("rlt_reward", "r_ss", "r_kl"):
            # An unclosed sample's reward is NaN until its group is known (rlt/unclosed.py).
            assert getattr(b, name) == pytest.approx(getattr(s, name), abs=1e-5, nan_ok=True)
        assert (b.solution_tokens, b.explanation_tokens) == (
            s.solution_tokens,
            s.explanation_tokens,
        )


# tag boundaries: BPE merging across the tags


@pytest.fixture(scope="module")
def merging():
    """A tokenizer without a pre-tokenizer split, trained on tagged text, so its merges cross
    tag boundaries ('>\\n\\n\\n', '.<|'), as Qwen's '>\\n\\n' does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .conftest import CHATML

    corpus = [
        f"{TAGS.explanation_start}\n\n\nFirst add.{TAGS.explanation_end}",
        f"{TAGS.thought_start}\nFirst add.{TAGS.thought_end}\n\n{TAGS.solution_start}42",
    ] * 20
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    ))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")  # fmt: skip
    tok.chat_template = CHATML
    return RLTModels(build_model(tok, seed=3), tok, build_model(tok, seed=4), tok,
                     teacher_system_prompt=None, student_system_prompt=None)  # fmt: skip


def test_tag_boundary_tokens_count_and_align(merging):
    s = Sample(QUESTION, "42", "\nFirst add.", id="edge")
    (prep,) = prepare(merging, [s], RewardConfig())
    t_text = build_teacher_text(merging.teacher_tokenizer, QUESTION, "42", s.explanation)
    offsets = merging.teacher_tokenizer(t_text.text, add_special_tokens=False,
                                        return_offsets_mapping=True)["offset_mapping"]  # fmt: skip
    first, last = offsets[prep.teacher_expl[0]], offsets[prep.teacher_expl[-1]]
    assert first[0] < t_text.explanation[0]  # merged with the tag's '\n\n' and still counted
    assert last[1] > t_text.explanation[1]  # '.' merged with the closing tag, still counted
    t_ids = [prep.teacher_ids[p] for p in prep.teacher_expl]
    s_ids = [prep.student_ids[p] for p in prep.student_expl]
    assert t_ids != s_ids  # the two contexts cut the explanation's edges differently
    assert prep.n_groups <= min(len(t_ids), len(s_ids))
    # the groups partition both sides: summed D equals Σ log π_θ − Σ log π_s, computed directly
    cfg = RewardConfig(alpha=0.0, kl_reductions=["sum", "sum"])
    t_enc, t_lp = direct(merging.teacher, merging.teacher_tokenizer, t_text.text, cfg.temperature)
    s_text = build_student_text(merging.student_tokenizer, QUESTION, "42", s.explanation)
    s_enc, s_lp = direct(merging.student, merging.student_tokenizer, s_text.text, cfg.temperature)
    want = sum(float(t_lp[p - 1]) for p in prep.teacher_expl) - sum(
        float(s_lp[p - 1]) for p in prep.student_expl
    )
    (got,) = reward_batch(merging, [s], cfg)
    assert got.r_kl == pytest.approx(want, abs=1e-5)
    batched = reward_batch(merging, [s, Sample(QUESTION, "42", "First add.", id="b")])
    single = reward_per_sample(merging, [s, Sample(QUESTION, "42", "First add.", id="b")])
    for b, p in zip(batched, single, strict=True):
        assert b.rlt_reward == pytest.approx(p.rlt_reward, abs=1e-5)


def test_empty_explanation_has_no_tokens_even_where_the_tags_merge(merging):
    """Found in a GRPO run: a teacher that closes at once leaves "" between the student's tags,
    which BPE may cover with one straddling token; it is no explanation token (r^KL = 0)."""
    s = Sample(QUESTION, "42", "", id="empty")
    (prep,) = prepare(merging, [s], RewardConfig())
    assert prep.teacher_expl == [] and prep.student_expl == [] and prep.n_groups == 0
    (batched,) = reward_batch(merging, [s])
    (single,) = reward_per_sample(merging, [s])
    assert batched.r_kl == 0.0 and batched.explanation_tokens == 0
    assert batched.r_ss == pytest.approx(single.r_ss, abs=1e-5)
    # it explains nothing: the missing-tag reward, not r^SS − λ·0 (which beat real explanations)
    assert math.isnan(batched.rlt_reward) and math.isnan(single.rlt_reward)
    (fixed,) = reward_batch(merging, [s], RewardConfig(missing_tag_reward=-4.0))
    assert fixed.rlt_reward == -4.0 and fixed.closed


def test_align_groups():
    same = [(0, 2), (2, 5), (5, 6)]
    assert align_groups(same, same, 6) == ([0, 1, 2], [0, 1, 2], 3)
    # a: leading token merged with the tag (starts before 0); b: the first piece split in two
    a_groups, b_groups, n = align_groups(
        [(-2, 1), (1, 4), (4, 7)], [(0, 1), (1, 2), (2, 4), (4, 6)], 6
    )
    assert (a_groups, b_groups, n) == ([0, 1, 2], [0, 1, 1, 2], 3)
    # bytes of one character split over two tokens share its range: no cut between them
    assert align_groups([(0, 1), (0, 1), (1, 2)], [(0, 2)], 2) == ([0, 0, 0], [0], 1)


# errors


def test_vocab_mismatch_is_a_model_error(tok, other_vocab_dir):
    from potstill.models import load_tokenizer

    other = load_tokenizer(other_vocab_dir)
    with pytest.raises(ModelError, match="one vocabulary"):
        RLTModels(build_model(tok), tok, build_model(other), other)


def test_empty_solution_names_the_record(models):
    with pytest.raises(DataError, match="record 'r1'.*empty solution"):
        reward_batch(models, [sample(1, solution="")])


# scoring records


def test_score_records_adds_fields_in_order(models):
    records = [
        {"id": "a", "question": QUESTION, "solution": "42", "explanation": "Add them."},
        {"id": "b", "question": "Calculate 5 - 3.", "solution": "2",
         "explanation": "Subtract.<|end_of_explanation|>junk"},
        {"id": "c", "question": QUESTION, "solution": "42", "explanation": "Add",
         "explanation_closed": False},
    ]  # fmt: skip
    pairs = (models.teacher, models.teacher_tokenizer), (models.student, models.student_tokenizer)
    out = score_records(records, *pairs, RewardConfig(), batch_size=2,
                        teacher_system_prompt=None, student_system_prompt=None)  # fmt: skip
    assert [r["id"] for r in out] == ["a", "b", "c"]
    for r in out:
        assert {"rlt_reward", "r_ss", "r_kl", "solution_tokens", "explanation_tokens"} <= set(r)
    # c is unclosed: 1 below the lowest closed reward of its question (a's)
    assert out[2]["rlt_reward"] == pytest.approx(out[0]["rlt_reward"] - 1.0)
    assert out[1]["explanation_closed"] is True
    (b,) = reward_batch(models, [Sample("Calculate 5 - 3.", "2", "Subtract.")])
    assert out[1]["rlt_reward"] == pytest.approx(b.rlt_reward, abs=1e-5)
    with pytest.raises(DataError, match=r"in\.jsonl: record 'x' has no text field 'explanation'"):
        score_records([{"id": "x", "question": "q", "solution": "s"}], *pairs, source="in.jsonl")


def test_run_score_end_to_end(tiny_model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [
        {"id": "a", "question": QUESTION, "solution": "42", "explanation": "Add 17 and 25."},
        {"id": "long", "question": QUESTION, "solution": "42", "explanation": "Add. " * 300},
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ModelConfig(name=str(tiny_model_dir), device="cpu")
    cfg = RLTScoreConfig(teacher=model, student=model, teacher_system_prompt=None,
                         student_system_prompt=None)  # fmt: skip
    stats = run_score(cfg, source, tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats["scored"] == 1 and stats["skipped"] == 1
    assert isinstance(out[0]["rlt_reward"], float) and out[0]["solution_tokens"] > 0
    assert out[1]["drop_reason"].startswith("context_too_long") and "rlt_reward" not in out[1]
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "m", "question": "q", "explanation": "e"}) + "\n")
    with pytest.raises(DataError, match="record 'm' has no text field 'solution'"):
        run_score(cfg, missing, tmp_path / "never.jsonl")
