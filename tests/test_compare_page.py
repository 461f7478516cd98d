"""compare.html: accuracy pooled per kind of held-out set, compute per method, drawn in Chromium."""

from __future__ import annotations

import json
import math
import re

import pytest

from potstill.report.compare_page import method_seconds, pooled, render_compare

from .test_report import PROBE, _browse, _chromium


def _cell(correct: int, n: int) -> dict:
    p = correct / n
    return {"accuracy": p, "n": n, "correct": correct, "stderr": math.sqrt(p * (1 - p) / n)}


def _table() -> dict:
    columns = [
        {"set": s, "kind": k, "variant": v}
        for s, k in (("arith", "in_distribution"), ("words", "rephrased"),
                     ("chain", "other_family"), ("products", "other_family"))
        for v in ("with_prompt", "no_prompt")
    ]  # fmt: skip
    counts = {  # correct of 20 per set, with prompt / without
        "teacher": (18, 17, 16, 15, 15, 14, 12, 11),
        "student (before)": (8, 7, 6, 5, 9, 8, 3, 2),
        "sft": (15, 12, 11, 8, 12, 10, 5, 4),
        "logit": (14, 13, 10, 9, 11, 11, 6, 5),
    }
    rows = []
    for model, numbers in counts.items():
        cells = {
            f"{c['set']}/{c['variant']}": _cell(k, 20)
            for c, k in zip(columns, numbers, strict=True)
        }
        row = {"model": model, "cells": cells}
        if model in ("sft", "logit"):
            row |= {"failed": None, "training": {"steps": 4, "tokens": 900, "seconds": 30.0}}
        rows.append(row)
    teacher = {"seconds": 70.0, "traces_s": 50.0, "cache_s": 20.0, "usd": 0.01}
    budget = {"max_steps": 4, "micro_batch_size": 2, "grad_accum": 2}
    return {"columns": columns, "rows": rows, "teacher_compute": teacher, "budget": budget}


def test_a_kind_pools_the_questions_of_its_sets():
    table = _table()
    other = pooled(table, "sft", "other_family", "with_prompt")  # chain 12/20 + products 5/20
    assert other["n"] == 40 and other["accuracy"] == pytest.approx(17 / 40)
    assert other["stderr"] == pytest.approx(math.sqrt(17 / 40 * 23 / 40 / 40))
    assert pooled(table, "logit", "rephrased", "no_prompt")["accuracy"] == pytest.approx(9 / 20)
    assert pooled(table, "nobody", "rephrased", "no_prompt") is None


def test_compute_adds_the_teacher_work_each_method_needed():
    rows = {r["model"]: r for r in _table()["rows"]}
    table = _table()
    assert method_seconds(table, rows["sft"]) == 30.0 + 50.0  # training + traces
    assert method_seconds(table, rows["logit"]) == 30.0 + 50.0 + 20.0  # + the top-k cache
    assert method_seconds(table, rows["teacher"]) is None


def test_the_page_holds_the_figure_and_every_cell(tmp_path):
    html = render_compare(_table(), "tiny taught by tiny")
    assert html.count("<img src='data:image/png;base64,") == 1
    assert "75.0% ± 9.7%" in html  # sft on arith with the prompt: 15/20
    assert html.count("<tr><td>") == 4
    assert "<script" not in html  # a static page


def test_chromium_draws_the_figure(tmp_path):
    import numpy as np
    from PIL import Image

    exe = _chromium()
    page = tmp_path / "compare.html"
    text = render_compare(_table(), "tiny taught by tiny")
    page.write_text(text)
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE))
    dom = _browse(exe, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    (img,) = json.loads(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1))
    assert img["ok"] and img["w"] > 1500 and img["h"] > 500, img
    shot = tmp_path / "shot.png"
    _browse(exe, f"--screenshot={shot}", page.as_uri())
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    x, y = int(img["x"]), int(img["y"])
    region = screen[y : y + int(img["ch"]), x : x + int(img["cw"])]
    assert (region.min(axis=2) < 200).mean() > 0.01  # axes, labels, markers
    assert (region.max(axis=2) - region.min(axis=2) > 60).mean() > 0.002  # coloured series


def test_several_seeds_give_mean_and_sd_and_widen_the_noise():
    from potstill.eval.compare import _over_seeds, inside_noise

    cells = [{"accuracy": a, "n": 20, "correct": a * 20, "stderr": 0.1} for a in (0.5, 0.6, 0.7)]
    cell = _over_seeds(cells)
    assert cell["accuracy"] == pytest.approx(0.6) and cell["sd"] == pytest.approx(0.1)
    assert cell["correct"] == pytest.approx(12.0) and cell["per_seed"] == [0.5, 0.6, 0.7]
    assert cell["stderr"] == pytest.approx((0.6 * 0.4 / 20 + 0.01 / 3) ** 0.5)
    # 0.6 vs 0.35 on 100 questions: outside the noise by the binomial s.e. alone (2 x 0.068 =
    # 0.137 < 0.25), inside once three seeds spread 0.4-0.8 (2 x 0.134 = 0.268 > 0.25).
    base = {"accuracy": 0.35, "n": 100}
    spread = [{"accuracy": a, "n": 100, "correct": a * 100} for a in (0.4, 0.6, 0.8)]
    assert not inside_noise({"accuracy": 0.6, "n": 100}, base)
    assert inside_noise(_over_seeds(spread), base)
    assert _over_seeds([cells[0], None]) == cells[0] and _over_seeds([None]) is None
