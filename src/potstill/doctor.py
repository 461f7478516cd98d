"""What a teacher/student pair can do, read from tokenizers and config.json alone (no weights):

    potstill doctor qwen2.5-coder-1.5b-instruct smollm2-135m-instruct [--json]

vocabulary sizes and exact-string overlap, the distill modes that apply, chat-template
differences (template, system role, end-of-turn, BOS), context lengths, parameter estimates, and
a one-line verdict. `diagnose` builds a `PairReport`; `report_lines` writes it as text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from jinja2 import TemplateError, TemplateSyntaxError

from potstill.data.chat import end_of_turn
from potstill.errors import ModelError
from potstill.losses.cross_vocab import vocab_matches
from potstill.models import check_same_vocab, load_model_config, load_tokenizer

SYSTEM_PROBE = "potstill0system0probe"
"""A system prompt searched for in the rendering (no whitespace or special token, so templates
that `trim` leave it as is): a template that renders without it drops system prompts."""
CONVERSATION = (
    {"role": "system", "content": SYSTEM_PROBE},
    {"role": "user", "content": "1"},
)

SYSTEM_ACCEPTED, SYSTEM_REFUSED, SYSTEM_DROPPED = "accepted", "refused", "dropped"
NO_TEMPLATE, BROKEN_TEMPLATE = "no chat template", "broken chat template"


@dataclass(frozen=True)
class ChatFacts:
    has_template: bool
    system_role: str
    """accepted, refused (potstill folds it into the first user turn), dropped (the template
    renders without it), no chat template, or broken chat template."""
    end_of_turn: str
    """What a training target ends with (`potstill.data.chat.end_of_turn`)."""
    bos_token: str | None
    tokenizer_adds_bos: bool
    """Encoding text with special tokens puts the BOS first."""
    template_writes_bos: bool
    """The template writes `bos_token` at the start of the rendered prompt."""


@dataclass(frozen=True)
class SizeFacts:
    """From config.json (the text model's config, for a multimodal one)."""

    model_type: str
    vocab_rows: int
    """Embedding and lm_head rows: may exceed the tokenizer (padding rows, never produced)."""
    context: int | None
    hidden: int
    layers: int
    intermediate: int
    tied_embeddings: bool
    parameters: int
    """`estimate_parameters`: closed form, Llama-style decoder."""


@dataclass(frozen=True)
class ModelFacts:
    spec: str
    tokens: int
    """len(tokenizer): the vocabulary with added tokens."""
    chat: ChatFacts
    sizes: SizeFacts | None
    """None when the folder has no config.json (a kit model whose tokenizer alone is ready)."""


@dataclass(frozen=True)
class Mode:
    name: str
    applies: bool
    how: str
    """The setting that runs it, or why it does not apply."""


@dataclass(frozen=True)
class PairReport:
    teacher: ModelFacts
    student: ModelFacts
    same_vocab: bool
    vocab_difference: str | None
    """check_same_vocab's refusal, when the vocabularies differ."""
    student_vocab: int
    matching_student_tokens: int
    """Student tokens spelled exactly as a teacher token (`vocab_matches`)."""
    modes: list[Mode]
    chat_notes: list[str]
    context_note: str | None
    verdict: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate_parameters(config) -> int:
    """Parameters of a Llama-style decoder (Llama, Qwen2/3, Mistral, SmolLM2) from its config:
    embeddings V·h, per layer the attention projections (q and o h·q_dim, k and v h·kv_dim, plus
    Qwen2's q/k/v biases or `attention_bias`), a gated MLP 3·h·i and two RMSNorms, a final norm,
    and the lm_head V·h unless tied. Exact for those families; an estimate for others."""
    text = config.get_text_config()
    hidden, vocab = text.hidden_size, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    q_dim = heads * head_dim
    kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    attention = 2 * hidden * q_dim + 2 * hidden * kv_dim
    if text.model_type == "qwen2":  # q/k/v always carry a bias there, o_proj none
        attention += q_dim + 2 * kv_dim
    elif getattr(text, "attention_bias", False):  # Llama's switch: every projection's bias
        attention += q_dim + 2 * kv_dim + hidden
    if text.model_type == "qwen3":  # RMSNorm on each head's q and k
        attention += 2 * head_dim
    mlp = 3 * hidden * text.intermediate_size
    if getattr(text, "mlp_bias", False):
        mlp += 2 * text.intermediate_size + hidden
    per_layer = attention + mlp + 2 * hidden
    head = 0 if _tied(config) else vocab * hidden
    return vocab * hidden + text.num_hidden_layers * per_layer + hidden + head


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def size_facts(config) -> SizeFacts:
    text = config.get_text_config()
    return SizeFacts(
        model_type=text.model_type,
        vocab_rows=text.vocab_size,
        context=getattr(text, "max_position_embeddings", None),
        hidden=text.hidden_size,
        layers=text.num_hidden_layers,
        intermediate=text.intermediate_size,
        tied_embeddings=_tied(config),
        parameters=estimate_parameters(config),
    )


def chat_facts(tokenizer) -> ChatFacts:
    bos = tokenizer.bos_token
    with_specials = tokenizer("1")["input_ids"]
    adds_bos = (
        bool(with_specials) and with_specials[0] == tokenizer.bos_token_id and bos is not None
    )
    if not getattr(tokenizer, "chat_template", None):
        return ChatFacts(False, NO_TEMPLATE, end_of_turn(tokenizer), bos, adds_bos, False)
    try:
        rendered = _render(tokenizer, CONVERSATION)
        system = SYSTEM_ACCEPTED if SYSTEM_PROBE in rendered else SYSTEM_DROPPED
    except TemplateSyntaxError:
        return ChatFacts(True, BROKEN_TEMPLATE, tokenizer.eos_token or "", bos, adds_bos, False)
    except TemplateError:
        system = SYSTEM_REFUSED
        rendered = _render(tokenizer, CONVERSATION[1:])
    # The template must name `bos_token` itself: SmolLM2's bos *is* `<|im_start|>`, which every
    # ChatML turn starts with, and that is not a BOS written before the conversation.
    writes_bos = bool(bos) and rendered.startswith(bos) and "bos_token" in tokenizer.chat_template
    return ChatFacts(True, system, end_of_turn(tokenizer), bos, adds_bos, writes_bos)


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def model_facts(spec: str, tokenizer, config) -> ModelFacts:
    sizes = size_facts(config) if config is not None else None
    return ModelFacts(str(spec), len(tokenizer), chat_facts(tokenizer), sizes)


def diagnose(teacher: str, student: str) -> PairReport:
    """Load both tokenizers and configs (never weights) and compare them."""
    specs = (teacher, student)
    tokenizers = [load_tokenizer(spec) for spec in specs]  # a bad spec fails here, one line
    configs = [load_model_config(spec) for spec in specs]
    return compare(
        model_facts(teacher, tokenizers[0], configs[0]),
        model_facts(student, tokenizers[1], configs[1]),
        *tokenizers,
    )


def compare(teacher: ModelFacts, student: ModelFacts, teacher_tok, student_tok) -> PairReport:
    """The report for two models' facts and their tokenizers (for the vocabulary checks)."""
    try:
        check_same_vocab(teacher_tok, student_tok)
        difference = None
    except ModelError as exc:
        difference = str(exc)
    student_vocab = student_tok.get_vocab()
    matching = len(vocab_matches(teacher_tok.get_vocab(), student_vocab))
    same = difference is None
    modes = distill_modes(same)
    verdict = (
        "same vocabulary — every distill mode applies"
        if same
        else f"different vocabularies ({matching:,} of {len(student_vocab):,} student tokens "
        "match) — use loss.cross_tokenizer online, or sequence-level distillation"
    )
    notes = [
        f"{role}: no config.json (a kit tokenizer alone): `potstill models prepare {m.spec}` "
        "for its sizes"
        for role, m in (("teacher", teacher), ("student", student))
        if m.sizes is None
    ]
    return PairReport(
        teacher, student, same, difference, len(student_vocab), matching, modes,
        chat_notes(teacher.chat, student.chat), context_note(teacher, student), verdict, notes,
    )  # fmt: skip


def distill_modes(same_vocab: bool) -> list[Mode]:
    """Logit KD compares distributions id by id: one vocabulary (check_same_vocab). Across
    vocabularies the aligned loss runs with an online teacher only, so far."""
    one_vocab = "needs one vocabulary"
    return [
        Mode("logit KD, online teacher", same_vocab, "distill teacher.mode=online" if same_vocab
             else one_vocab),
        Mode("logit KD, offline cache", same_vocab, "teacher cache, then distill "
             "teacher.mode=offline" if same_vocab else one_vocab),
        Mode("on-policy KD", same_vocab, "distill teacher.mode=on_policy" if same_vocab
             else one_vocab),
        Mode("RLT (teacher scored under the student)", same_vocab, "rlt train" if same_vocab
             else one_vocab),
        Mode("cross-tokenizer KD", not same_vocab, "distill teacher.mode=online with "
             "loss.cross_tokenizer={loss: hybrid}" if not same_vocab
             else "not needed: the vocabularies are one"),
        Mode("sequence-level", True, "generate → curate → sft (text only: any pair)"),
    ]  # fmt: skip


def chat_notes(teacher: ChatFacts, student: ChatFacts) -> list[str]:
    """One line per chat-template difference or per side that needs potstill's help."""
    sides = (("teacher", teacher), ("student", student))
    notes = []
    if teacher.has_template != student.has_template:
        with_one = "teacher" if teacher.has_template else "student"
        without = "student" if teacher.has_template else "teacher"
        notes.append(
            f"chat template: only the {with_one} has one; the {without}'s prompts are plain "
            "'Question: … Answer:' text"
        )
    for role, chat in sides:
        if chat.system_role == SYSTEM_REFUSED:
            notes.append(
                f"{role}: no system role: potstill folds the system prompt into the first user turn"
            )
        elif chat.system_role == SYSTEM_DROPPED:
            notes.append(f"{role}: its chat template drops the system prompt")
        elif chat.system_role == BROKEN_TEMPLATE:
            notes.append(f"{role}: its chat template does not parse; fix or replace it")
    if teacher.end_of_turn != student.end_of_turn:
        notes.append(
            f"end of turn: teacher {teacher.end_of_turn!r}, student {student.end_of_turn!r} "
            "(each target ends with its own model's)"
        )
    bos = [(role, _bos_text(chat)) for role, chat in sides]
    if bos[0][1] != bos[1][1]:
        notes.append(f"BOS: teacher {bos[0][1]}, student {bos[1][1]}")
    return notes


def _bos_text(chat: ChatFacts) -> str:
    if chat.template_writes_bos and chat.tokenizer_adds_bos:
        return f"{chat.bos_token!r} from the template and the tokenizer (twice)"
    if chat.template_writes_bos:
        return f"{chat.bos_token!r} from the template"
    if chat.tokenizer_adds_bos:
        return f"{chat.bos_token!r} added by the tokenizer"
    return "none added"


def context_note(teacher: ModelFacts, student: ModelFacts) -> str | None:
    lengths = [m.sizes.context if m.sizes else None for m in (teacher, student)]
    if None in lengths:
        return None
    smaller = min(lengths)
    if lengths[0] == lengths[1]:
        return f"context: {smaller:,} tokens each"
    return (
        f"context: teacher {lengths[0]:,}, student {lengths[1]:,} tokens; a pair's sequences "
        f"must fit in {smaller:,}"
    )


def report_lines(report: PairReport) -> list[str]:
    """The report as text, one fact a line, the verdict last."""
    t, s = report.teacher, report.student
    share = report.matching_student_tokens / max(report.student_vocab, 1)
    lines = [f"teacher: {t.spec}", f"student: {s.spec}", "", "vocabulary:"]
    lines += [f"  {role}: {_vocab_line(m)}" for role, m in (("teacher", t), ("student", s))]
    lines.append(
        f"  exact-string overlap: {report.matching_student_tokens:,} of {report.student_vocab:,} "
        f"student tokens ({share:.1%}) are spelled as a teacher token"
    )
    lines.append("  same vocabulary" if report.same_vocab else f"  {_difference(report)}")
    lines += ["", "distill modes:"]
    lines += [f"  {'yes' if m.applies else 'no ':3} {m.name}: {m.how}" for m in report.modes]
    lines += ["", "chat:"]
    lines += [f"  {role}: {_chat_line(m.chat)}" for role, m in (("teacher", t), ("student", s))]
    lines += [f"  {note}" for note in report.chat_notes] or ["  no differences"]
    lines += ["", "sizes (config.json):"]
    lines += [f"  {role}: {_size_line(m)}" for role, m in (("teacher", t), ("student", s))]
    if report.context_note:
        lines.append(f"  {report.context_note}")
    lines += [f"  {note}" for note in report.notes]
    return [*lines, "", f"verdict: {report.verdict}"]


def _difference(report: PairReport) -> str:
    """check_same_vocab's facts without its framing (the modes below say what follows)."""
    text = report.vocab_difference or ""
    text = text.removeprefix("teacher and student tokenizers differ: ")
    return "differ: " + text.split("; logit distillation")[0]


def _vocab_line(model: ModelFacts) -> str:
    line = f"{model.tokens:,} tokens"
    if model.sizes is None:
        return line
    padding = model.sizes.vocab_rows - model.tokens
    rows = f"{model.sizes.vocab_rows:,} embedding/lm_head rows"
    if padding > 0:
        return f"{line}, {rows} ({padding:,} padding rows)"
    if padding < 0:
        return f"{line}, only {rows}: {-padding:,} tokens have no row"
    return f"{line}, {rows}"


def _chat_line(chat: ChatFacts) -> str:
    if not chat.has_template:
        return f"no chat template; ends with eos {chat.end_of_turn!r}"
    return (
        f"system role {chat.system_role}; end of turn {chat.end_of_turn!r}; BOS {_bos_text(chat)}"
    )


def _size_line(model: ModelFacts) -> str:
    z = model.sizes
    if z is None:
        return "unknown (no config.json)"
    context = f"{z.context:,}" if z.context else "unknown"
    tied = "tied" if z.tied_embeddings else "untied"
    return (
        f"{z.model_type}, ~{z.parameters / 1e6:,.1f}M parameters ({z.parameters:,}: {z.layers} "
        f"layers, hidden {z.hidden:,}, MLP {z.intermediate:,}, {tied} embeddings), "
        f"context {context}"
    )
