"""`potstill compare`: which distillation method makes the best student, on held-out sets that
test transfer, at the same student budget.

    potstill compare --config configs/compare-cpu.yaml

1. The teacher answers the training questions once; its verified traces (curated, shortest per
   question) are what every method learns from.
2. One student per method (and training seed), each the existing stage underneath
   (stages/compare_methods.py), each in its own run directory under `methods/`, every one with
   the same optimizer steps (`budget.max_steps`):
   sft (SFT on the traces), logit (the teacher's top-k cache over the same traces, distill with
   the hard+soft mix), logit_soft (the same cache, soft targets alone: Hinton's soft-vs-hard
   check against sft, which learns the teacher's argmax text), on_policy (GKD: the student
   samples, the teacher scores),
   sft_then_on_policy (half the steps SFT, then on-policy from that student), and rlt (SFT on
   an RLT teacher's explanations of each training answer, the best of N by RLT reward).
3. Every student, the student before training and (optionally) the teacher answer every held-out
   set, with the training system prompt and without it.
4. One table (`compare.md`, `compare.json`): accuracy ± standard error per model × set, the
   student's training tokens, seconds and estimated FLOPs, the teacher's compute and $, and which
   differences from the untrained student are inside the noise.

A killed compare, rerun, redoes only what is unfinished (every step is a resumable stage); a
method that fails is reported as failed and the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from rich.console import Console

from potstill.config import check
from potstill.config.sections import (
    SOURCE,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_given,
    check_seed,
)
from potstill.data import read_records, write_records
from potstill.errors import ConfigError, PotstillError
from potstill.eval.compare import BASELINE, Method, compare_table, write_tables
from potstill.eval.config import CostConfig, EvalTask, HeldOutSet, eval_model
from potstill.eval.tasks import normal_question
from potstill.fsutil import atomic_write_text
from potstill.report.compare_page import render_compare
from potstill.runs import RunDir
from potstill.stages.compare_methods import CompareRLTConfig, train_method
from potstill.train.kd_config import KDLossConfig, OnPolicyConfig

METHODS = ("sft", "logit", "logit_soft", "on_policy", "sft_then_on_policy", "rlt")
MethodName = Literal["sft", "logit", "logit_soft", "on_policy", "sft_then_on_policy", "rlt"]


@dataclass
class CompareConfig:
    """Train one student per method from the same teacher traces under the same step budget;
    evaluate every student on every held-out set."""

    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="qwen2.5-coder-1.5b-instruct")
    )
    """The teacher: writes the traces, and is the logit / on-policy teacher (same vocabulary)."""
    student: ModelConfig = field(default_factory=lambda: ModelConfig(lora=LoraConfig()))
    """The student every method starts from."""
    train: str = "rg:basic_arithmetic?size=40&seed=1&max_terms=3&max_digits=2"
    """Training questions (with answers, for verifying the teacher's traces)."""
    held_out: list[HeldOutSet] = field(default_factory=lambda: [HeldOutSet()])
    """Held-out sets; none may share a question (by id or text) with the training questions."""
    methods: list[MethodName] = field(default_factory=lambda: list(METHODS))
    """Methods to compare, each trained for budget.max_steps optimizer steps."""
    decoding: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            max_new_tokens=96, batch_size=16, system_prompt="arithmetic_steps"
        )
    )
    """How the teacher writes traces and how every model answers the held-out sets; its system
    prompt is the training prompt."""
    eval_without_system_prompt: bool = True
    """Also evaluate the students with no system prompt (does the gain survive without it?)."""
    eval_teacher: bool = True
    """Evaluate the teacher on the held-out sets too (the ceiling of the table), with the
    training system prompt."""
    eval_teacher_without_system_prompt: bool = False
    """Also evaluate the teacher with no system prompt: on a CPU the slowest pass of all."""
    budget: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            lr=2e-4, max_steps=20, micro_batch_size=4, grad_accum=2, max_seq_len=256,
            warmup_ratio=0.1, save_every=5,
        )
    )  # fmt: skip
    """The student budget every method gets: the same optimizer steps and batch."""
    loss: KDLossConfig = field(default_factory=KDLossConfig)
    """The logit method's loss (divergence, temperature, hard/soft mix)."""
    on_policy_loss: KDLossConfig = field(
        default_factory=lambda: KDLossConfig(divergence="reverse_kl")
    )
    """The on-policy methods' loss (GKD uses reverse KL or JSD)."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """GKD's λ and the student's sampling."""
    cache_k: int = 64
    """Top-k of the teacher cache the logit method distils from."""
    rlt: CompareRLTConfig = field(default_factory=CompareRLTConfig)
    """The rlt method's explaining teacher and sampling."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Training seeds (data order, LoRA init, dropout, sampling; each sets budget.seed): one
    student per method and seed. With several, the table gives each method's mean ± sd over
    seeds; use ≥ 3 where methods differ by little."""
    cost: CostConfig = field(default_factory=CostConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/compare"))

    def __post_init__(self):
        check_given(self.train, "train", SOURCE)
        check(bool(self.held_out), "held_out: empty; list at least one held-out set")
        check(bool(self.methods), f"methods: empty; choose from {', '.join(METHODS)}")
        names = [s.name for s in self.held_out]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, f"held_out: set names must be unique, '{dupes[0] if dupes else ''}'")
        check(
            len(set(self.methods)) == len(self.methods),
            f"methods: each method once, got {self.methods}",
        )
        check(
            self.budget.max_steps is not None,
            "budget.max_steps: required; every method trains for exactly this many steps",
        )
        check(
            "sft_then_on_policy" not in self.methods or (self.budget.max_steps or 0) >= 2,
            "budget.max_steps: sft_then_on_policy splits the steps in two; give at least 2",
        )
        check(self.cache_k > 0, f"cache_k: must be > 0, got {self.cache_k}")
        check(bool(self.seeds), "seeds: empty; give at least one training seed, e.g. [0]")
        check(len(set(self.seeds)) == len(self.seeds), f"seeds: each once, got {self.seeds}")
        for seed in self.seeds:
            check_seed(seed)


def run_compare(cfg: CompareConfig, console: Console | None = None) -> dict:
    console = console or Console(stderr=True)
    out = Path(cfg.run.output_dir)
    train, held_out = _read_and_check(cfg)  # bad input fails before anything is written
    _check_vocab(cfg)  # tokenizers only: a pair a method cannot use fails before the traces
    sources = [cfg.train, *(s.source for s in cfg.held_out)]
    # Each method and held-out set is its own work: a rerun may add some (or leave some out).
    grows = ("methods", "held_out", "seeds")
    with RunDir(out, command="compare", config=cfg, inputs=sources, growable=grows) as run:
        data = run.path / "data"
        write_records(data / "train.jsonl", train)
        for name, records in held_out.items():
            write_records(data / f"held-out-{name}.jsonl", records)
        with run.timed("traces"):
            kept = _teacher_traces(cfg, run.path, console)
        methods = []
        # Seed by seed, each evaluated and tabled before the next: a run cut short has a table
        # of every method at the seeds it finished (the evals grow by the new students only).
        for seed in cfg.seeds:
            for name in cfg.methods:
                console.rule(f"[bold]method {name}, seed {seed}")
                methods.append(train_method(cfg, name, seed, run.path, kept, console))
            table = _evaluate_and_table(cfg, run, methods, console)
        run.count(methods=len(methods), failed=sum(m.failed is not None for m in methods))
    console.print(table["markdown"])
    return table


def _evaluate_and_table(cfg: CompareConfig, run: RunDir, methods: list[Method], console) -> dict:
    """Evaluate the students trained so far (and, once, the teacher and the untrained student),
    score their held-out NLL, and write compare.md / .json / .html."""
    with run.timed("eval"):
        _evaluate(cfg, run.path, methods, console)
    if cfg.eval_teacher:
        with run.timed("nll"):
            _held_out_nll(cfg, run.path, methods, console)
    table = compare_table(run.path, cfg, methods)
    write_tables(run.path, table)
    page = render_compare(table, title=f"{cfg.student.name} taught by {cfg.teacher.name}")
    atomic_write_text(run.path / "compare.html", page)
    return table


def _read_and_check(cfg: CompareConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    train = read_records(cfg.train)
    held = {s.name: read_records(s.source) for s in cfg.held_out}
    source = {s.name: s.source for s in cfg.held_out}
    ids, texts = {r["id"] for r in train}, {normal_question(r["question"]) for r in train}
    for name, records in held.items():
        if not records:
            raise ConfigError(f"held_out '{name}': {source[name]} holds no records")
        by_id = next((r["id"] for r in records if r["id"] in ids), None)
        by_text = next((r["id"] for r in records if normal_question(r["question"]) in texts), None)
        if by_id or by_text:
            how = f"id '{by_id}'" if by_id else f"the text of '{by_text}'"
            raise ConfigError(
                f"held_out '{name}': shares {how} with the training questions ({cfg.train}); a "
                "held-out set must be unseen: draw it from another seed or source"
            )
    return train, held


def _check_vocab(cfg: CompareConfig) -> None:
    """The methods that compare the two models token id by token id (on-policy, rlt; logit
    unless loss.cross_tokenizer) need one vocabulary: refuse another pair now, not after the
    teacher's traces."""
    cross = cfg.loss.cross_tokenizer is not None
    any_vocab = ("sft", "logit", "logit_soft") if cross else ("sft",)
    needs = [m for m in cfg.methods if m not in any_vocab]
    if not needs:
        return
    from potstill.models import check_same_vocab, load_tokenizer

    try:
        check_same_vocab(load_tokenizer(cfg.teacher.name), load_tokenizer(cfg.student.name))
    except PotstillError as exc:
        logit = any(m.startswith("logit") for m in needs)
        hint = " (logit methods: or set loss.cross_tokenizer, e.g. {loss: hybrid})" if logit else ""
        raise ConfigError(
            f"methods {', '.join(needs)} need one vocabulary: {exc}; drop them{hint}"
        ) from None


def _teacher_traces(cfg: CompareConfig, path: Path, console) -> str:
    """The teacher answers the training questions (greedy, the eval's decoding); curation keeps
    the verified, untruncated, shortest answer per question. Returns kept.jsonl's path."""
    from potstill.curate.pipeline import DedupConfig, FormatConfig, SelectConfig
    from potstill.eval.results import answers_dir
    from potstill.stages.curate import CurateConfig, run_curate
    from potstill.stages.eval import EvalConfig, run_eval

    teacher = eval_model(cfg.teacher, "teacher", "teacher")
    eval_cfg = EvalConfig(
        models=[teacher], tasks=[EvalTask(source=str(path / "data" / "train.jsonl"), name="train")],
        generation=replace(cfg.decoding, temperature=0.0, num_samples=1), cost=cfg.cost,
        run=RunConfig(output_dir=str(path / "traces"), log_with=cfg.run.log_with),
    )  # fmt: skip
    run_eval(eval_cfg, console)
    from potstill.config.sections import DataConfig

    run_curate(
        CurateConfig(
            data=DataConfig(source=str(answers_dir(path / "traces", "teacher", "train"))),
            format=FormatConfig(drop_truncated=True, tags=[]),
            dedup=DedupConfig(exact=True, near=False),
            select=SelectConfig(k=1, order="shortest"),
            run=RunConfig(output_dir=str(path / "curate"), log_with=cfg.run.log_with),
        ),
        console,
    )
    kept = path / "curate" / "kept.jsonl"
    if not kept.read_text().strip():
        raise PotstillError(
            f"{path / 'curate' / 'funnel.json'}: the teacher got no training question right; "
            "use a stronger teacher or an easier task"
        )
    return str(kept)


def _evaluate(cfg: CompareConfig, path: Path, methods: list[Method], console) -> None:
    """Every model on every held-out set, with the training system prompt and (optionally)
    without; each variant one resumable eval run."""
    from potstill.stages.eval import EvalConfig, run_eval

    models = [eval_model(cfg.student, "student (before)", "student")]
    if cfg.eval_teacher:
        models.insert(0, eval_model(cfg.teacher, "teacher", "teacher"))
    for m in methods:
        if m.failed is None:
            models.append(eval_model(cfg.student, m.label, "student", name=str(m.final)))
    tasks = [
        EvalTask(source=str(path / "data" / f"held-out-{s.name}.jsonl"), name=s.name)
        for s in cfg.held_out
    ]
    prompts = {"with_prompt": cfg.decoding.system_prompt}
    if cfg.eval_without_system_prompt and cfg.decoding.system_prompt:
        prompts["no_prompt"] = None
    for variant, prompt in prompts.items():
        answering = models
        if variant == "no_prompt" and not cfg.eval_teacher_without_system_prompt:
            answering = [m for m in models if m.label != "teacher"]
        run_eval(
            EvalConfig(
                models=answering, tasks=tasks, exclude=[str(path / "data" / "train.jsonl")],
                generation=replace(cfg.decoding, system_prompt=prompt), cost=cfg.cost,
                run=RunConfig(output_dir=str(path / "eval" / variant), log_with=cfg.run.log_with),
            ),
            console,
        )  # fmt: skip


def _held_out_nll(cfg: CompareConfig, path: Path, methods: list[Method], console) -> None:
    """Each student's NLL of the teacher's verified held-out answers (with the training prompt),
    per set, into nll/LABEL.json; a label already there is not scored again."""
    from potstill.data.shards import read_shards
    from potstill.eval.nll import answer_nlls, summarise
    from potstill.eval.results import answers_dir, slug
    from potstill.models import load_model, load_tokenizer

    answers = {
        s.name: [
            r for r in read_shards(answers_dir(path / "eval" / "with_prompt", "teacher", s.name))
            if r.get("verified") and r.get("finish_reason") != "length"
        ]
        for s in cfg.held_out
    }  # fmt: skip
    system = cfg.decoding.system_prompt
    students = [(BASELINE, cfg.student.name)]
    students += [(m.label, str(m.final)) for m in methods if m.failed is None]
    tokenizer = load_tokenizer(cfg.student.name, trust_remote_code=cfg.student.trust_remote_code)
    for label, name in students:
        out = path / "nll" / f"{slug(label)}.json"
        if out.is_file():
            continue
        console.print(f"held-out NLL of the teacher's answers under {label}")
        model = load_model(name, dtype=cfg.student.dtype, device=cfg.student.device).eval()
        scores = {
            set_name: summarise(answer_nlls(model, tokenizer, records, system, batch_size=4))
            for set_name, records in answers.items()
        }
        del model
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(scores, indent=2) + "\n")


def load_summary(path: str | Path) -> dict:
    """The table a finished compare wrote (`compare.json`)."""
    return json.loads((Path(path) / "compare.json").read_text())
