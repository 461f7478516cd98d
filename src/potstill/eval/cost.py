"""What a model costs to run: parameters, bytes on disk, peak memory, speed, and $ per answers.

Peak memory on CPU is the process's resident set sampled while the model answers (after loading,
so a loader's transient copies don't count), minus what was resident before it was loaded; freed
models are handed back to the OS, so consecutive models in one process are measured apart. On CUDA
it is the allocator's peak. $ per 1,000 answers is the measured wall time per answer (batched, as
the eval ran) times the hardware's price per hour, which the user states: an estimate, not a bill.
Latency is what one user waits for one answer: a few questions answered alone (batch of one).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def price_per_1k_answers(seconds_per_answer: float, usd_per_hour: float) -> float:
    return seconds_per_answer * 1000 / 3600 * usd_per_hour


def weight_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files that make the model: a directory's weights, a single file, and
    for a LoRA adapter directory its base model's weights too. None for a hub id (not on disk
    here as a directory of its own)."""
    from potstill.models import resolve_model_path

    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    total = sum(
        p.stat().st_size for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            total += weight_bytes(resolve_model_path(base)) or 0
    return total


def hardware_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core CPU ({platform.machine()})"


def release_memory() -> None:
    """Give freed memory back to the OS: glibc keeps freed heap pages (weights under its mmap
    threshold) for reuse, so a model deleted before the next one loads would still count twice."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class MemoryMeter:
    """Peak memory over a `with` block, above what was in use when it began."""

    interval: float = 0.05
    peak_bytes: int = 0

    def __enter__(self) -> MemoryMeter:
        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        release_memory()  # earlier stages' freed pages would otherwise hide this model's size
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def reset_peak(self) -> None:
        """Forget the peak so far (a loader's transient copies), keeping the baseline."""
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._peak = _rss_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *_) -> None:
        if self._cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_bytes = self._peak - self._base


@dataclass
class SpeedMeter:
    """Answers, generated tokens and wall time of one model's (batched) generation."""

    answers: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def record(self, completion_tokens: int) -> None:
        self.answers += 1
        self.tokens += completion_tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def stop(self) -> None:
        self.seconds += self.elapsed()


def cost_summary(
    *,
    params: int,
    disk_bytes: int,
    peak_memory_bytes: int,
    speed: SpeedMeter,
    usd_per_hour: float,
    load_seconds: float,
    latency_s: float | None,
) -> dict:
    per_answer = speed.seconds / max(speed.answers, 1)
    return {
        "params": params,
        "disk_bytes": disk_bytes,
        "peak_memory_bytes": peak_memory_bytes,
        "load_seconds": round(load_seconds, 2),
        "seconds_per_answer": round(per_answer, 4),
        "latency_s": None if latency_s is None else round(latency_s, 3),
        "tokens_per_s": round(speed.tokens / max(speed.seconds, 1e-9), 2),
        "mean_completion_tokens": round(speed.tokens / max(speed.answers, 1), 1),
        "usd_per_1k_answers": round(price_per_1k_answers(per_answer, usd_per_hour), 5),
    }
