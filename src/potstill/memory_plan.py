"""`potstill doctor … --config FILE`: predicted peak memory and time per step of an sft or distill
config, from config.json and the config alone (no weights load).

The peak is the sum of what one optimizer step holds at its worst moment, the backward pass of a
micro-batch (from the second step on, AdamW's state exists):

- weights: the student's parameters in its dtype, LoRA adapters in float32 (PEFT keeps them so);
- gradients: one per trained value, in the trained values' dtype;
- AdamW: two moments per trained value (exp_avg, exp_avg_sq), in that dtype;
- activations: what autograd saves per token per trained layer (`layer_floats`), for
  micro_batch_size × max_seq_len tokens; with gradient checkpointing each layer keeps its input
  and one layer is recomputed at a time;
- the loss's buffers: sft's [tokens, V] logits path, distill's fused-loss chunk
  (`losses.chunked.chunk_rows` rows × V × `ROW_BUFFERS` float32 buffers); across tokenizers
  one chunk of both sides' rows (`losses.cross_chunked`, × `CROSS_ROW_BUFFERS`);
- the teacher (online): its weights in inference, plus its last hidden states;
- on CPU, the allocator's retention: freed activation pages glibc's malloc keeps
  (`ALLOCATOR_RETENTION_CPU`), and the process's own overhead (`RUNTIME_CPU_BYTES`).

Time per optimizer step is FLOPs over a throughput: forward 2·N per token, the backward's input
gradients 2·N per token through the trained layers, weight gradients 2·N_trained per token (full
fine-tuning: 6·N in all), gradient checkpointing one more forward, an online teacher 2·N_t.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

from potstill.losses.chunked import ROW_BUFFERS, chunk_rows, eager_chunk_rows
from potstill.losses.cross_chunked import cross_chunk_rows

GIB = 1 << 30
FLOAT32 = 4
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2}
SFT_ROW_BUFFERS = 4
"""[tokens, V] float32 buffers of sft's loss at its peak: the logits, cross-entropy's saved
log-softmax, and in the backward its gradient and the logits' gradient."""
TOPK_ROW_BUFFERS = 7
"""Offline (top-k teacher) chunk buffers, the most `losses.chunked.ROW_BUFFERS` lists for them."""
CROSS_ROW_BUFFERS = 7
"""float32 copies of a chunk's student [c, V_s] and teacher [c, V_t] rows the cross-vocabulary
loss holds at its peak (the hybrid loss's log-softmaxes, renormalised matched parts, the
unmatched sort, and with them the chunk's gradients, taken in its forward): 7.4 measured on the
kit pair at 256 and 2,048 rows (benchmarks/cross_tokenizer.py); the plan's peak was 4.7% under
a real run's with 6 (tests/test_doctor_plan.py)."""
RUNTIME_CPU_BYTES = 185 << 20
"""What a trainer process holds beyond its tensors on CPU: the libraries the stage imports
(peft alone ~140 MiB), accelerate's state, thread pools. Measured as the peak of a 2-step sft and
distill run of the tiny test model (hidden 32: its tensors weigh kilobytes): 185-186 MiB. On a
GPU the plan counts the allocator's bytes, where these are not."""
ALLOCATOR_RETENTION_CPU = 1.25
"""Freed memory glibc's malloc keeps on CPU, as a multiple of the activations: after a large
block is freed its mmap threshold rises, later blocks come from arenas it does not trim, and a
step's freed activations stay resident beside the next step's. Measured as the peak's drop when
the trainer runs with `RETURN_FREED_ENV` (the rest of the plan then matches within 2-7%):
1.07×, 1.33× and 1.47× the activations on three runs of small random models (docs/doctor.md)."""
RETURN_FREED_ENV = "MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0"
"""glibc settings under which large blocks are mapped and freed memory goes back at once."""
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder's sizes, from config.json."""

    parameters: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    head_dim: int
    kv_dim: int

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_dim
        dims = ((h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h))
        return dict(zip(LINEARS, dims, strict=True))


def model_shape(config) -> Shape:
    from potstill.doctor import estimate_parameters

    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return Shape(
        estimate_parameters(config), text.vocab_size, text.hidden_size, text.intermediate_size,
        text.num_hidden_layers, heads, head_dim, kv_heads * head_dim,
    )  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What of an sft or distill config the plan reads (`settings_from_config`)."""

    stage: str
    micro_batch_size: int
    max_seq_len: int
    grad_accum: int
    gradient_checkpointing: bool
    weight_bytes: int
    lora_rank: int | None = None
    lora_modules: tuple[str, ...] = LINEARS
    lora_dropout: float = 0.0
    lora_top_layers: int | None = None
    teacher_mode: str | None = None
    """online, on_policy, offline, or None (sft)."""
    teacher_bytes: int = 2
    teacher_storage_bytes: int | None = None
    """teacher.storage_dtype: bytes a weight of the teacher's linear layers (the rest stays at
    teacher_bytes)."""
    cross_tokenizer: bool = False
    """loss.cross_tokenizer: the teacher's vocabulary is another one (its rows are chunked too)."""
    chunk_size: int | None = None
    runtime_bytes: int = 0
    """The process's own overhead (`RUNTIME_CPU_BYTES` on CPU, 0 on a GPU)."""
    allocator_retention: float = 0.0
    """`ALLOCATOR_RETENTION_CPU` on CPU unless `RETURN_FREED_ENV` is set; 0 on a GPU (the
    caching allocator's bytes are the tensors')."""

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.max_seq_len


def dtype_bytes(dtype: str, on_gpu: bool) -> int:
    """Bytes per weight as `models.resolve_dtype` picks them: auto is bf16 on a GPU, else fp32."""
    if dtype == "auto":
        return 2 if on_gpu else 4
    return DTYPE_BYTES[dtype]


def settings_from_config(cfg, stage: str, on_gpu: bool) -> Settings:
    """The plan's settings from a loaded SFTConfig or DistillConfig."""
    model = cfg.model if stage == "sft" else cfg.student
    train, lora = cfg.train, model.lora
    modules = LINEARS
    if lora is not None and lora.target_modules != "all-linear":
        names = lora.target_modules
        names = [names] if isinstance(names, str) else names
        modules = tuple(n for n in LINEARS if n in names)
    teacher = getattr(cfg, "teacher", None)
    return Settings(
        stage=stage,
        micro_batch_size=train.micro_batch_size,
        max_seq_len=train.max_seq_len,
        grad_accum=train.grad_accum,
        gradient_checkpointing=train.gradient_checkpointing,
        weight_bytes=dtype_bytes(model.dtype, on_gpu),
        lora_rank=lora.r if lora else None,
        lora_modules=modules,
        lora_dropout=lora.dropout if lora else 0.0,
        lora_top_layers=lora.top_layers if lora else None,
        teacher_mode=teacher.mode if teacher else None,
        teacher_bytes=dtype_bytes(teacher.model.dtype, on_gpu) if teacher else 2,
        teacher_storage_bytes=DTYPE_BYTES[teacher.storage_dtype]
        if teacher and stage == "distill" and teacher.storage_dtype
        else None,
        cross_tokenizer=stage == "distill" and cfg.loss.cross_tokenizer is not None,
        chunk_size=cfg.loss.chunk_size if stage == "distill" else None,
        runtime_bytes=0 if on_gpu else RUNTIME_CPU_BYTES,
        allocator_retention=0.0 if on_gpu or _returns_freed() else ALLOCATOR_RETENTION_CPU,
    )


def _returns_freed() -> bool:
    """Whether this environment (which the trainer inherits) sets glibc's mmap threshold."""
    return "MALLOC_MMAP_THRESHOLD_" in os.environ


def lora_parameters(shape: Shape, s: Settings) -> int:
    """r·(in + out) per adapted projection, over the adapted layers."""
    if s.lora_rank is None:
        return 0
    dims = shape.linear_dims()
    per_layer = sum(s.lora_rank * sum(dims[name]) for name in s.lora_modules)
    return per_layer * trained_layers(shape, s)


def trained_layers(shape: Shape, s: Settings) -> int:
    return min(s.lora_top_layers or shape.layers, shape.layers)


def layer_floats(shape: Shape, s: Settings) -> int:
    """Values autograd saves per token in one decoder layer (transformers' Llama/Qwen2 layer,
    SDPA attention), counted with `torch.autograd.graph.saved_tensors_hooks` over layer widths
    and found exactly linear: full fine-tuning 8h + 4i + 2·kv_dim + heads + 2; LoRA 6h + 4i +
    2·kv_dim + heads + 2 + r per adapted projection (the frozen norms' outputs are not kept);
    LoRA dropout > 0 keeps each projection's dropped input besides (10h + i for all seven)."""
    h, i = shape.hidden, shape.intermediate
    common = 4 * i + 2 * shape.kv_dim + shape.heads + 2
    if s.lora_rank is None:
        return 8 * h + common
    floats = 6 * h + common + s.lora_rank * len(s.lora_modules)
    if s.lora_dropout > 0:
        dims = shape.linear_dims()
        inputs = sum(dims[name][0] for name in s.lora_modules)
        floats += inputs + 4 * h * len(s.lora_modules) // len(LINEARS)
    return floats


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes at the step's peak, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    loss_chunks: int
    teacher: int
    runtime: int
    allocator: int
    trainable: int

    @property
    def peak(self) -> int:
        return (
            self.weights + self.gradients + self.optimizer + self.activations
            + self.loss_chunks + self.teacher + self.runtime + self.allocator
        )  # fmt: skip


def activation_bytes(shape: Shape, s: Settings, checkpointing: bool) -> int:
    """Saved activations of one micro-batch; in the dtype of the weights."""
    per_layer = layer_floats(shape, s) * s.tokens * s.weight_bytes
    layers = trained_layers(shape, s)
    if checkpointing:  # each layer keeps its input; one layer's activations are rebuilt
        return layers * shape.hidden * s.tokens * s.weight_bytes + per_layer
    return layers * per_layer


def loss_bytes(shape: Shape, s: Settings, teacher: Shape | None = None) -> int:
    """The loss's float32 [rows, V] buffers at their peak."""
    rows = s.micro_batch_size * (s.max_seq_len - 1)  # every position a target: the worst case
    if s.stage == "sft":
        return rows * shape.vocab * FLOAT32 * SFT_ROW_BUFFERS
    if s.cross_tokenizer and teacher is not None:  # every target paired: the worst case
        chunk = min(s.chunk_size or cross_chunk_rows(shape.vocab, teacher.vocab), rows)
        return chunk * (shape.vocab + teacher.vocab) * FLOAT32 * CROSS_ROW_BUFFERS
    buffers = TOPK_ROW_BUFFERS if s.teacher_mode == "offline" else ROW_BUFFERS
    chunk = eager_chunk_rows(s.chunk_size or chunk_rows(shape.vocab), rows)
    return chunk * shape.vocab * FLOAT32 * buffers


def teacher_bytes(teacher: Shape | None, s: Settings) -> int:
    if teacher is None or s.teacher_mode in (None, "offline"):
        return 0
    weights = teacher.parameters * s.teacher_bytes
    if s.teacher_storage_bytes is not None and s.teacher_storage_bytes < s.teacher_bytes:
        linear = teacher.layers * sum(i * o for i, o in teacher.linear_dims().values())
        weights -= linear * (s.teacher_bytes - s.teacher_storage_bytes)
    return weights + s.tokens * teacher.hidden * s.teacher_bytes


def plan_memory(student: Shape, teacher: Shape | None, s: Settings) -> MemoryPlan:
    """Each part of the peak (see the module docstring)."""
    adapters = lora_parameters(student, s)
    trainable = adapters if s.lora_rank is not None else student.parameters
    trained_bytes = FLOAT32 if s.lora_rank is not None else s.weight_bytes
    without = activation_bytes(student, s, checkpointing=False)
    with_ = activation_bytes(student, s, checkpointing=True)
    activations = with_ if s.gradient_checkpointing else without
    return MemoryPlan(
        weights=student.parameters * s.weight_bytes + adapters * FLOAT32,
        gradients=trainable * trained_bytes,
        optimizer=2 * trainable * trained_bytes,
        activations=activations,
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_,
        loss_chunks=loss_bytes(student, s, teacher),
        teacher=teacher_bytes(teacher, s),
        runtime=s.runtime_bytes,
        allocator=int(s.allocator_retention * activations),
        trainable=trainable,
    )


def step_flops(student: Shape, teacher: Shape | None, s: Settings) -> float:
    """FLOPs of one optimizer step (grad_accum micro-batches)."""
    n, tokens = student.parameters, s.tokens
    trained_share = trained_layers(student, s) / student.layers
    trainable = lora_parameters(student, s) if s.lora_rank is not None else n
    per_token = 2 * n + 2 * n * trained_share + 2 * trainable
    if s.gradient_checkpointing:
        per_token += 2 * n * trained_share
    if teacher is not None and s.teacher_mode not in (None, "offline"):
        per_token += 2 * teacher.parameters
    return per_token * tokens * s.grad_accum


def measure_throughput(size: int = 512, seconds: float = 0.5, dtype="auto") -> float:
    """FLOP/s of a size×size matmul on the CPU in `dtype` as a model config names it (auto:
    float32 there), the best over `seconds` of repeats (after as long a warm-up: the thread pool
    and oneDNN's kernels are built on first use, and the first calls run ~10x slow): the
    ceiling a training step's matmuls reach."""
    import torch

    from potstill.models import resolve_dtype

    a = torch.randn(size, size, dtype=resolve_dtype(dtype, "cpu"))
    b = torch.randn(size, size, dtype=a.dtype)
    best, warm_until = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < warm_until:
        a @ b
    stop = time.perf_counter() + seconds
    while (start := time.perf_counter()) < stop:
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


@dataclass(frozen=True)
class Plan:
    memory: MemoryPlan
    seconds_per_step: float
    flops_per_step: float
    throughput: float
    throughput_source: str
    available: int
    available_source: str
    verdict: str
    suggestions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**asdict(self), "peak": self.memory.peak}


def suggestions(student: Shape, teacher: Shape | None, s: Settings, available: int) -> list[str]:
    """Single changes that bring the peak within `available`, cheapest first; else the
    combination of all of them."""
    tries = []
    if not s.gradient_checkpointing:
        checkpointed = replace(s, gradient_checkpointing=True)
        tries.append(("train.gradient_checkpointing=true", checkpointed))
    mb = s.micro_batch_size
    while mb > 1:
        mb //= 2
        accum = s.grad_accum * s.micro_batch_size // mb
        tries.append(
            (f"train.micro_batch_size={mb} train.grad_accum={accum} (same batch)",
             replace(s, micro_batch_size=mb, grad_accum=accum)),
        )  # fmt: skip
    key = "model" if s.stage == "sft" else "student"
    if s.lora_rank is None:
        tries.append((f"{key}.lora={{r: 16}}", replace(s, lora_rank=16, lora_dropout=0.05)))
    if s.teacher_mode in ("online", "on_policy"):
        if s.teacher_bytes > 2 and s.teacher_storage_bytes is None:  # fp32 arithmetic kept
            tries.append(("teacher.storage_dtype=bfloat16", replace(s, teacher_storage_bytes=2)))
        if s.teacher_bytes > 2:
            tries.append(("teacher.model.dtype=bfloat16", replace(s, teacher_bytes=2)))
        tries.append(("teacher.mode=offline (a `potstill teacher cache` first)",
                      replace(s, teacher_mode="offline")))  # fmt: skip
    if s.allocator_retention:
        returned = replace(s, allocator_retention=0.0)
        tries.append((f"{RETURN_FREED_ENV} in the environment (freed memory goes back to the "
                      "system; steps run slower)", returned))  # fmt: skip
    fits = [text for text, t in tries if plan_memory(student, teacher, t).peak <= available]
    if fits:
        return fits
    both = replace(s, gradient_checkpointing=True, micro_batch_size=1,
                   grad_accum=s.grad_accum * s.micro_batch_size)  # fmt: skip
    if plan_memory(student, teacher, both).peak <= available:
        return ["train.gradient_checkpointing=true train.micro_batch_size=1 together"]
    return [
        f"none of gradient checkpointing, micro_batch_size=1, LoRA fits: shorten "
        f"train.max_seq_len (now {s.max_seq_len}) or use a device with more memory"
    ]


def make_plan(
    student: Shape, teacher: Shape | None, s: Settings, *, available: int, available_source: str,
    throughput: float, throughput_source: str,
) -> Plan:  # fmt: skip
    memory = plan_memory(student, teacher, s)
    flops = step_flops(student, teacher, s)
    fits = memory.peak <= available
    verdict = (
        f"fits: ~{memory.peak / GIB:.2f} GiB of {available / GIB:.2f} GiB available"
        if fits
        else f"does not fit: ~{memory.peak / GIB:.2f} GiB needed, {available / GIB:.2f} GiB "
        "available"
    )
    return Plan(
        memory, flops / throughput, flops, throughput, throughput_source, available,
        available_source, verdict, [] if fits else suggestions(student, teacher, s, available),
    )  # fmt: skip
