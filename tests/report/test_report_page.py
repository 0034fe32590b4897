"""write_report on synthetic run folders: a self-contained page with every section, overlays, graceful gaps."""

from __future__ import annotations

import base64
import io
import json
import re
import statistics

import pytest
import yaml
from PIL import Image
from tiny_models import build_tiny, randomize_adapters

from lorafit import AdapterConfig, attach, save_adapter
from lorafit.report import adapter_update_norms, write_report
from lorafit.report.plots import line_figure
from lorafit.report.run_data import load_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("Diagnosis", "Training curves", "Evaluation before → after", "Adapter update by layer", "Config")
EXTERNAL = re.compile(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def sft_rows(steps: int = 10, start: float = 2.0, drop: tuple[str, ...] = ()) -> list[dict]:
    """What the SFT trainer logs; `drop` removes columns (each column costs a figure, ~0.2 s)."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / steps, "loss": start / step, "lr": 1e-3 * (1 - step / (steps + 1)),
               "grad_norm": 1.0 / step, "tokens_per_s": 100.0 + 10 * (step % 3), "tokens_seen": 800 * step}
        if step % 4 == 0 or step == steps:
            row["eval_loss"] = start / step + 0.1 * (step == steps)  # best eval loss at step 8, not the last
        rows.append({k: v for k, v in row.items() if k not in drop})
    return rows


FEW = ("grad_norm", "tokens_per_s")  # columns the tests of other things leave out


EVAL_BEFORE = {"metric": "json", "correct": 1, "total": 10, "accuracy": 0.1,
               "samples": [{"prompt": "Ship two <mugs> to Oslo", "reply": "I can't"}]}
EVAL_AFTER = {"metric": "json", "correct": 9, "total": 10, "accuracy": 0.9,
              "samples": [{"prompt": "Ship two <mugs> to Oslo", "reply": '{"item": "mug"}'}]}


def make_run(path, rows=None, summary=True, adapter=True, config=True, diagnosis=None, lr=1e-3):
    path.mkdir(parents=True)
    rows = sft_rows() if rows is None else rows
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config:
        (path / "config.yaml").write_text(yaml.safe_dump({
            "model": "tiny-llama", "output_dir": str(path), "adapter": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
            "training": {"lr": lr, "batch_size": 4}, "data": {"max_seq_len": 128}}, sort_keys=False))
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "steps": len(rows), "final_loss": rows[-1]["loss"] if rows else None, "phases_s": {"train_s": 125.0},
            "eval_before": EVAL_BEFORE, "eval_after": EVAL_AFTER}))
    if adapter:
        model = build_tiny("llama")
        attach(model, AdapterConfig(r=4, alpha=8), warn_scale=False)
        randomize_adapters(model)
        save_adapter(model, path / "adapter")
    if diagnosis is not None:
        (path / "diagnosis.json").write_text(json.dumps(diagnosis))
    return path


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_full_run_page_is_self_contained_with_every_section(tmp_path):
    run = make_run(tmp_path / "run1")
    page = write_report(run, diagnosis=[{"pattern": "early_plateau", "evidence": {"plateau_step": 6},
                                         "advice": "Raise the rank or try DoRA."}]).read_text()
    assert EXTERNAL.search(page) is None and "<link" not in page and "<script" not in page
    assert re.findall(r'<img[^>]*src="([a-z]+):', page) == ["data"] * 5  # 4 curves + 1 heatmap, all inline
    for png in images(page):
        assert png.startswith(PNG_SIGNATURE) and Image.open(io.BytesIO(png)).size[0] > 300
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page
    assert "early plateau" in page and "Raise the rank or try DoRA." in page and "plateau_step = 6" in page
    assert "Ship two &lt;mugs&gt; to Oslo" in page and "<mugs>" not in page  # user text is escaped
    assert "1/10 (10.0%)" in page and "9/10 (90.0%)" in page and "+80.0 pts" in page
    top = sorted(adapter_update_norms(run / "adapter"), key=lambda n: n.norm, reverse=True)[:8]
    table = re.findall(r'<tr><td class="mono">(model[^<]+)</td>', page)
    assert table == [n.module for n in top]  # the largest-updates table, largest first
    assert "target_modules: all-linear" in page  # the config text


def test_headline_numbers(tmp_path):
    rows = sft_rows()
    page = write_report(make_run(tmp_path / "run1", rows=rows)).read_text()
    evals = [(r["eval_loss"], r["step"]) for r in rows if "eval_loss" in r]
    best_loss, best_step = min(evals)
    assert best_step == 8
    cards = dict(re.findall(r'<div class="label">([^<]+)</div><div class="value">([^<]+)</div>', page))
    assert cards["Steps"] == "10"
    assert cards["Final train loss"] == f"{rows[-1]['loss']:.4g}"
    assert cards["Best eval loss"] == f"{best_loss:.4g}" and f"at step {best_step}" in page
    assert cards["Throughput"] == f"{statistics.median(r['tokens_per_s'] for r in rows):,.0f}"
    assert cards["Eval before → after"] == "10% → 90%" and cards["Training time"] == "2m 05s"


def test_pngs_are_written_beside_the_page_and_replace_old_ones(tmp_path):
    run = make_run(tmp_path / "run1")
    (run / "report").mkdir()
    (run / "report" / "stale.png").write_bytes(b"old")
    write_report(run)
    names = sorted(p.name for p in (run / "report").iterdir())
    assert names == ["adapter_norms_run1.png", "grad_norm.png", "loss.png", "lr.png", "tokens_per_s.png"]
    assert all((run / "report" / n).read_bytes().startswith(PNG_SIGNATURE) for n in names)


def test_every_other_numeric_column_gets_a_panel(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-5, "reward_mean": 0.1 * s, "reward_std": 0.5, "kl": 0.01 * s,
             "completion_length": 40 + s, "clip_fraction": 0.0, "reward/format": 1.0, "reward/correct": 0.1 * s,
             "note": "text", "epoch": s / 4, "tokens_seen": 100 * s} for s in range(1, 5)]
    run = make_run(tmp_path / "grpo", rows=rows, summary=False, adapter=False)
    write_report(run)
    names = {p.stem for p in (run / "report").iterdir()}
    assert names == {"loss", "lr", "reward_mean", "reward_std", "kl", "completion_length", "clip_fraction",
                     "reward_format", "reward_correct"}  # not the axis counters, not the text column
    assert [line.get_label() for line in line_figure([load_run(run)], "loss").axes[0].get_lines()] == ["train"]


@pytest.mark.parametrize("n_runs", [2, 3])
def test_compare_overlays_every_run(tmp_path, n_runs):
    paths = [make_run(tmp_path / f"run{i}", rows=sft_rows(start=1.0 + i, drop=FEW), adapter=i == 0,
                      lr=1e-3 if i == 0 else 5e-4) for i in range(n_runs)]
    page = write_report(paths[0], compare=paths[1:]).read_text()
    runs = [load_run(p) for p in paths]
    loss_lines = [line.get_label() for line in line_figure(runs, "loss").axes[0].get_lines()]
    assert loss_lines == [f"run{i} {kind}" for i in range(n_runs) for kind in ("train", "eval")]
    for i, run in enumerate(runs):  # each overlaid line carries that run's own values
        line = line_figure(runs, "lr").axes[0].get_lines()[i]
        assert list(line.get_ydata()) == [r["lr"] for r in run.metrics]
    names = re.findall(r'<td><span class="swatch" style="background:[^"]+"></span>([^<]+)</td>', page)
    assert names == [f"run{i}" for i in range(n_runs)]  # the runs table
    assert "no adapter folder" in page  # the compared runs saved none
    assert '<td class="mono">training.lr</td><td class="mono">0.001</td><td class="mono">0.0005</td>' in page


def test_same_named_runs_are_told_apart(tmp_path):
    a = make_run(tmp_path / "a" / "run", rows=sft_rows(drop=FEW + ("lr",)), adapter=False)
    b = make_run(tmp_path / "b" / "run", rows=sft_rows(drop=FEW + ("lr",)), adapter=False)
    page = write_report(a, compare=[b]).read_text()
    assert "a/run</td>" in page and "b/run</td>" in page


def test_missing_pieces_leave_notes_not_crashes(tmp_path):
    run = make_run(tmp_path / "bare", rows=sft_rows(drop=FEW), summary=False, adapter=False, config=False)
    page = write_report(run).read_text()
    for note in ("no summary.json", "no adapter folder", "no config.yaml", "no loss-curve diagnosis"):
        assert note in page
    assert "<h2>Training curves</h2>" in page and len(images(page)) == 2  # loss and lr

    empty = tmp_path / "empty"
    empty.mkdir()
    page = write_report(empty).read_text()
    assert "the run logged no step" in page and images(page) == []


def test_summary_without_evaluation_and_unreadable_files(tmp_path):
    run = make_run(tmp_path / "run1", rows=sft_rows(drop=FEW + ("lr",)))
    (run / "summary.json").write_text(json.dumps({"steps": 10, "final_loss": 0.2, "phases_s": {},
                                                  "eval_before": None, "eval_after": None}))
    page = write_report(run).read_text()
    assert "no generation evaluation" in page and "no generation eval" in page
    (run / "summary.json").write_text(json.dumps({"steps": 10, "phases_s": {"train_s": "soon"},
                                                  "eval_before": {"accuracy": "high"}, "eval_after": None}))
    page = write_report(run).read_text()
    assert "eval_before lacks correct/total/accuracy" in page
    (run / "summary.json").write_text("{torn")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"junk")
    page = write_report(run).read_text()
    assert "summary.json is not valid JSON" in page and "adapter not measured" in page


@pytest.mark.parametrize("stored", [
    [{"pattern": "healthy", "evidence": {}, "advice": "Nothing to change."}],
    {"findings": [{"pattern": "healthy", "evidence": {}, "advice": "Nothing to change."}]},
])
def test_diagnosis_is_read_from_the_run_folder(tmp_path, stored):
    run = make_run(tmp_path / "run1", rows=sft_rows(drop=FEW + ("lr",)), adapter=False, diagnosis=stored)
    page = write_report(run).read_text()
    assert '<div class="finding good"><div class="pattern">healthy</div><div>Nothing to change.</div>' in page


def test_a_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")


def _full_config(run, method="sft"):
    """config.yaml as a trainer writes it: every section, a long output_dir (the value that ran into the next
    column), and for GRPO the rewards it used."""
    from lorafit.run_config import GRPOConfig, RewardSpec, RunConfig, to_dict
    from lorafit.run_dir import RunDir

    long_dir = str(run) + "/experiments/" + "very_long_folder_name_without_breaks_" * 4 + "final"
    config = RunConfig(model="tiny-llama", output_dir=long_dir, method=method,
                       rewards=[RewardSpec("rewards.py:correct")] if method == "grpo" else [],
                       grpo=GRPOConfig())
    config.data.train = str(run) + "/data/" + "train_split_" * 8 + ".jsonl"
    RunDir(run).write_config(to_dict(config))
    return long_dir


def _config_panel(page: str) -> str:
    return page[page.index("<h2>Config</h2>"):]


def test_config_panel_shows_only_the_keys_of_the_runs_method(tmp_path):
    sft = make_run(tmp_path / "sft", rows=sft_rows(drop=FEW + ("lr",)), adapter=False, config=False)
    _full_config(sft, "sft")
    panel = _config_panel(write_report(sft).read_text())
    assert "method: sft" in panel and "adapter:" in panel and "training:" in panel
    assert "grpo:" not in panel and "rewards:" not in panel and "num_generations" not in panel

    grpo = make_run(tmp_path / "grpo", rows=sft_rows(drop=FEW + ("lr",)), adapter=False, config=False)
    _full_config(grpo, "grpo")
    panel = _config_panel(write_report(grpo).read_text())
    assert "grpo:" in panel and "num_generations" in panel and "rewards.py:correct" in panel


def _browser() -> str | None:
    import shutil

    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


LAYOUT_PROBE = """<script>
const problems = [];
const width = window.innerWidth;
if (document.documentElement.scrollWidth > width) problems.push(`page ${document.documentElement.scrollWidth}px wide`);
for (const section of document.querySelectorAll("section")) {
  const edge = section.getBoundingClientRect().right;
  for (const el of section.querySelectorAll("*")) {
    const r = el.getBoundingClientRect();
    if (r.width && r.right > edge + 1) problems.push(`${el.tagName}.${el.className} ends at ${r.right}, section at ${edge}`);
  }
}
const pre = document.querySelector("pre.config"), style = getComputedStyle(pre), box = pre.getBoundingClientRect();
const left = box.left + parseFloat(style.paddingLeft) + parseFloat(style.borderLeftWidth);
const inner = pre.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
const gap = parseFloat(style.columnGap) || parseFloat(style.fontSize), wanted = parseFloat(style.columnWidth);
const n = Math.max(1, Math.floor((inner + gap) / (wanted + gap))), column = (inner - (n - 1) * gap) / n;
const range = document.createRange();
range.selectNodeContents(pre);
let lines = 0;
for (const r of range.getClientRects()) {
  if (!r.width) continue;
  lines += 1;
  const k = Math.floor((r.left - left + 1) / (column + gap));
  if (r.right > left + k * (column + gap) + column + 1) problems.push(`config line at ${r.left}-${r.right} leaves column ${k}`);
}
document.body.setAttribute("data-layout", JSON.stringify({problems, columns: n, lines}));
</script>"""


@pytest.mark.skipif(_browser() is None, reason="headless Chromium is not installed (apt-get install chromium): "
                                               "the report's layout is not checked in a browser")
def test_report_layout_in_a_browser_at_1280px(tmp_path):
    import subprocess

    run = make_run(tmp_path / "run1", rows=sft_rows(drop=FEW), adapter=False, config=False)
    long_dir = _full_config(run)
    page = write_report(run).read_text()
    assert long_dir in html_unescape(page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"))
    flags = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,3000"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", probe.as_uri()], check=True, capture_output=True, timeout=120)
    assert Image.open(shot).size == (1280, 3000)
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    layout = json.loads(html_unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))
    assert layout["columns"] >= 3 and layout["lines"] > 20  # the config really is laid out in columns
    assert layout["problems"] == []


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)
