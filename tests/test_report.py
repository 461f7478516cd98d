"""`potstill report`: the page over realistic run directories, partial input, the CLI, and the page
as a browser shows it (headless Chromium: images decoded, plot pixels on screen)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from potstill.errors import ConfigError
from potstill.report import collect, write_report
from potstill.report.plots import panel_of

from .conftest import assert_one_line_error, run_cli
from .report_runs import make_incomplete, make_pipeline, make_run, write_metrics

IMG = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)' alt='([^']*)'>")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return make_pipeline(tmp_path_factory.mktemp("report") / "quickstart")


@pytest.fixture(scope="module")
def page(pipeline) -> tuple[Path, str]:
    html = write_report([pipeline])
    return html, html.read_text()


def test_page_has_every_plot_embedded_and_nothing_external(page, pipeline):
    html, text = page
    assert html == pipeline / "report.html"
    images = IMG.findall(text)
    alts = [alt for _, alt in images]
    # Pareto view, one curves figure per training run (sft, distill, rlt), the funnel.
    assert alts == [
        "accuracy vs cost",
        "training curves of quickstart/sft",
        "training curves of quickstart/distill",
        "training curves of quickstart/rlt",
        "funnel of quickstart/curate",
    ]
    for data, _ in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert text.count("<img") == len(images)
    for external in ("http://", "https://", "<link", "<script", "src='/", 'src="'):
        assert external not in text


def test_headline_answers_kept_accuracy_at_what_cost(page):
    _, text = page
    # teacher 60/80 = 75%, student after 53/80 = 66%, before 36/80 = 45%; cost 0.0833 / 0.267
    assert (
        "The student keeps 88% of the teacher&#x27;s accuracy (66% vs 75%) at 31% of its cost"
        in text
    )
    assert "before distillation it scored 45%" in text
    for card in ("teacher", "student · before", "student · after"):
        assert f"<div class='role'>{card}</div>" in text
    assert "$0.267" in text and "$0.0833" in text and "$0.0889" in text
    assert "494M params" in text and "1.54G params" in text
    assert "2.9×" in text  # 41 tok/s vs 14 tok/s
    assert "Incomplete" not in text  # nothing missing in a full pipeline


def test_models_from_several_eval_runs_are_merged_by_label(pipeline):
    coll = collect([pipeline])
    assert list(coll.models) == ["teacher", "student (before)", "student (after)"]
    assert coll.models["student (after)"].run == "quickstart/eval-final"
    # the final eval writes flat cost fields, the baseline a nested `cost` block
    assert coll.models["student (after)"].cost["usd_per_1k_answers"] == pytest.approx(0.0833)
    assert coll.models["teacher"].cost["params"] == 1543714304
    assert {(r.model, r.task) for r in coll.results} == {
        (m, t)
        for m in ("teacher", "student (before)", "student (after)")
        for t in ("gsm_symbolic", "basic_arithmetic")
    }
    assert coll.price_per_hour == 0.10


def test_training_curves_come_from_tensorboard_with_their_groups(pipeline):
    coll = collect([pipeline])
    runs = {r.name.split("/")[-1]: r for r in coll.training}
    assert set(runs) == {"sft", "distill", "rlt"}
    assert all(r.curves_source == "tensorboard" for r in runs.values())
    assert len(runs["sft"].curves["loss"]) == 60
    assert {"kd", "kd_ratio"} <= set(runs["distill"].curves)
    assert {"reward", "reward/r_ss", "reward/r_kl"} <= set(runs["rlt"].curves)
    assert runs["sft"].wall_s == pytest.approx(236.5)


@pytest.mark.parametrize(
    ("tag", "panel"),
    [
        ("loss", "loss"),
        ("ce", "loss"),
        ("kd", "loss"),
        ("loss/soft", "loss"),
        ("kd_ratio", "alpha"),
        ("reward", "reward"),
        ("reward/r_ss", "reward_parts"),
        ("r_kl", "reward_parts"),
        ("lr", "lr"),
        ("grad_norm", "grad_norm"),
        ("tokens_per_s", "throughput"),
        ("entropy", "tag:entropy"),
    ],
)
def test_scalars_land_in_their_panel(tag, panel):
    assert panel_of(tag) == panel


def test_markdown_summary_beside_the_page(page):
    html, _ = page
    md = html.with_suffix(".md").read_text()
    assert md.startswith("# potstill report: quickstart")
    assert "| student (after) | student | 66% | $0.0833 |" in md
    assert "| select | 41 → 11 | 11 → 11 | over_k 30 |" in md
    assert "## Training: quickstart/distill (distill, completed)" in md
    assert "[report.html](report.html)" in md


def test_incomplete_runs_report_what_exists_and_list_what_is_missing(tmp_path, capsys):
    root = make_incomplete(tmp_path / "partial")
    html = write_report([root], tmp_path / "out" / "partial.html")
    text, md = html.read_text(), (tmp_path / "out" / "partial.md").read_text()
    err = capsys.readouterr().err
    expected = [
        "partial/sft: did not complete (last attempt interrupted)",
        "partial/sft: training curves (no TensorBoard events, no metrics.jsonl)",
        "partial/curate: funnel.json",
        "partial/eval: did not complete (last attempt failed)",
        "partial/eval: eval.json",
        "no eval run (eval.json)",
    ]
    for item in expected:
        assert item in text and item in md and f"missing: {item}" in err
    assert "<h2>Incomplete</h2>" in text
    # what exists still reports: the generate run's counts, the settings of every run
    assert "teacher-x" in text and ">8<" in text
    assert text.count("<details>") == 4
    assert "No funnel.json in this run." in text


def test_metrics_jsonl_is_the_fallback_for_curves(tmp_path):
    run = make_run(
        tmp_path / "runs" / "sft", "sft", {"train": {"lr": 1e-4}}, timings={"train": 7200}
    )
    write_metrics(run, {"loss": [0.9, 0.5, 0.3], "ce": [0.9, 0.5, 0.3], "lr": [1e-4] * 3})
    html = write_report([tmp_path / "runs"], price_per_hour=2.5)
    text = html.read_text()
    assert "curves from metrics.jsonl" in text
    assert len(IMG.findall(text)) == 1
    assert "≈ $5.00" in text  # 2 h at $2.50/h, from --price-per-hour
    assert "TensorBoard events" in text  # listed as missing, the fallback named


def test_a_run_holding_others_counts_once_and_broken_json_is_a_missing_line(tmp_path):
    outer = make_run(tmp_path / "qs", "quickstart", {}, timings={"all": 100.0})
    make_run(outer / "sft", "sft", {}, timings={"train": 60.0})
    ev = make_run(outer / "eval", "eval", {}, timings={"eval": 40.0})
    (ev / "eval.json").write_text('{"models": [')  # torn by a kill
    coll = collect([outer])
    assert coll.contains(coll.runs[0]) == 2 and coll.total_seconds == 100.0
    html = write_report([outer]).read_text()
    assert "qs/eval: eval.json is unreadable (JSONDecodeError)" in html
    assert "holds the 2 runs below" in html


def test_one_of_several_paths_without_runs_is_a_missing_line(tmp_path, pipeline):
    (tmp_path / "empty").mkdir()
    html = write_report([pipeline, tmp_path / "empty"], tmp_path / "r.html")
    assert "empty: no run directory" in html.read_text()


def test_nothing_to_report_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no run directory"):
        write_report([tmp_path / "empty"])


def test_cli_nonexistent_path_is_one_line_exit_2(tmp_path):
    proc = run_cli("report", str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist")
    assert not list(tmp_path.iterdir())


def test_cli_writes_page_and_summary(tmp_path, pipeline):
    out = tmp_path / "site" / "index.html"
    proc = run_cli("report", str(pipeline), "--out", str(out), "--price-per-hour", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and (tmp_path / "site" / "index.md").is_file()
    assert "$0.50/hour (--price-per-hour)" in out.read_text()


# --- in a browser ----------------------------------------------------------------------------

PROBE = """<script>
addEventListener('load', () => {
  const found = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {w: i.naturalWidth, h: i.naturalHeight, ok: i.complete,
            x: r.left + scrollX, y: r.top + scrollY, cw: r.width, ch: r.height};
  });
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script></body>"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip(
            "chromium not installed (Debian: apt-get install chromium; scripts/run.sh does)"
        )
    return found


def _browse(exe: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += ["--force-device-scale-factor=1", "--window-size=1280,2400"]
    return subprocess.run(
        [exe, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_chromium_decodes_the_plots_and_draws_them(page, tmp_path):
    import numpy as np
    from PIL import Image

    exe = _chromium()
    html, text = page
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", PROBE))
    dom = _browse(exe, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()).stdout
    found = json.loads(re.search(r"<pre id=\"probe\">(.*?)</pre>", dom, re.S).group(1))
    assert len(found) == 5
    assert all(img["ok"] and img["w"] > 500 and img["h"] > 200 for img in found), found

    shot = tmp_path / "shot.png"
    _browse(exe, f"--screenshot={shot}", html.as_uri())
    assert shot.stat().st_size > 100_000
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert screen.shape == (2400, 1280, 3)
    on_screen = [img for img in found if img["y"] + img["ch"] <= 2400]
    assert len(on_screen) >= 2  # the Pareto view and the first training curves
    for img in on_screen:
        x, y = int(img["x"]), int(img["y"])
        region = screen[y : y + int(img["ch"]), x : x + int(img["cw"])]
        inked = (region.min(axis=2) < 200).mean()
        coloured = (region.max(axis=2) - region.min(axis=2) > 60).mean()
        assert inked > 0.01, (img, inked)  # axes, text and data, not a blank frame
        assert coloured > 0.002, (img, coloured)  # the data series themselves are in colour
