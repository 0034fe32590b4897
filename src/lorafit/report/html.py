"""The report page: one self-contained HTML string (inline CSS, figures as base64 PNG, no external URL)."""

from __future__ import annotations

import base64
import datetime
from html import escape
from typing import Any

import yaml

from lorafit.report.norms import ModuleNorm
from lorafit.report.plots import Panel, run_colors
from lorafit.report.run_data import RunData, headline, is_number
from lorafit.run_config import method_keys

TOP_MODULES = 8  # rows in the "largest updates" table
SAMPLES_SHOWN = 3
SEVERE = ("nan", "loss_spike", "divergent_validation")  # diagnosis patterns drawn in red; healthy is green

CSS = """
:root{--fg:#111827;--muted:#6b7280;--line:#e5e7eb;--bg:#f8fafc;--card:#fff;--accent:#2563eb;--good:#15803d;
--warn:#b45309;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:14px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1240px;margin:0 auto;padding:28px 32px 48px}
header{border-bottom:1px solid var(--line);padding-bottom:14px;margin-bottom:20px}
.brand{font-size:12px;letter-spacing:.08em;text-transform:uppercase;color:var(--accent);font-weight:600}
h1{font-size:26px;margin:2px 0 4px}
h2{font-size:17px;margin:0 0 12px}
h3{font-size:14px;margin:14px 0 8px;color:var(--muted)}
.sub{color:var(--muted);margin:0}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 20px;margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(170px,1fr));gap:12px;background:none;border:0;
padding:0}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.card .value{font-size:22px;font-weight:650;margin-top:2px;font-variant-numeric:tabular-nums}
.card .detail{font-size:12px;color:var(--muted)}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(500px,1fr));gap:14px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px 10px;background:#fff}
figcaption{font-weight:600;font-size:13px;margin-bottom:4px}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:12px;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right}
pre,code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
pre{background:#f3f4f6;border-radius:8px;padding:12px 14px;overflow:auto;margin:0}
pre.config{column-width:300px;column-rule:1px solid var(--line);white-space:pre-wrap;overflow-wrap:anywhere}
td.mono{white-space:pre-wrap;word-break:break-word;max-width:420px}
.note{color:var(--muted);font-style:italic;margin:0}
.finding{border-left:4px solid var(--warn);background:#fffbeb;border-radius:6px;padding:10px 14px;margin:0 0 10px}
.finding.good{border-color:var(--good);background:#f0fdf4}
.finding.bad{border-color:var(--bad);background:#fef2f2}
.finding .pattern{font-weight:650}
.chip{display:inline-block;background:#fff;border:1px solid var(--line);border-radius:999px;padding:1px 8px;
margin:4px 4px 0 0;font-size:12px}
.up{color:var(--good)}.down{color:var(--bad)}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
details summary{cursor:pointer;color:var(--muted);margin-bottom:8px}
footer{color:var(--muted);font-size:12px;text-align:center}
"""


def render_page(runs: list[RunData], panels: list[Panel], heatmaps: dict[str, bytes]) -> str:
    """The whole page for `runs` (the first is the subject, the others compared), with the figures embedded."""
    main = runs[0]
    title = main.name if len(runs) == 1 else f"{main.name} vs {', '.join(r.name for r in runs[1:])}"
    body = [
        '<header><div class="brand">lorafit · run report</div>',
        f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(_subtitle(main))}</p></header>",
        _headline_cards(main) if len(runs) == 1 else _comparison_table(runs),
        _diagnosis_section(runs),
        _curves_section(panels, runs),
        _evaluation_section(runs),
        _eval_sets_section(runs),
        _forgetting_section(runs),
        _adapter_section(runs, heatmaps),
        _config_section(runs),
        f"<footer>generated {datetime.datetime.now():%Y-%m-%d %H:%M} from {escape(str(main.path))}</footer>",
    ]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>lorafit report · {escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def _subtitle(run: RunData) -> str:
    config = run.config or {}
    adapter, training, data = (config.get(k) or {} for k in ("adapter", "training", "data"))
    parts = [f"model {config['model']}" if config.get("model") else None,
             config.get("method"),
             f"r {adapter['r']} · alpha {adapter['alpha']:g}" if is_number(adapter.get("r")) and is_number(
                 adapter.get("alpha")) else None,
             "rsLoRA" if adapter.get("use_rslora") else None,
             "DoRA" if adapter.get("use_dora") else None,
             f"targets {adapter['target_modules']}" if adapter.get("target_modules") else None,
             f"lr {training['lr']:g}" if is_number(training.get("lr")) else None,
             f"batch {training['batch_size']}" if training.get("batch_size") else None,
             f"max_seq_len {data['max_seq_len']}" if data.get("max_seq_len") else None]
    return " · ".join(str(p) for p in parts if p) or "configuration unknown (no config.yaml)"


def _headline_cards(run: RunData) -> str:
    h = headline(run)
    cards = [("Steps", _fmt(h["steps"]), ""),
             ("Final train loss", _fmt(h["final_loss"]), ""),
             ("Best eval loss", _fmt(h["best_eval_loss"]),
              f"at step {h['best_eval_step']}" if h["best_eval_step"] is not None else "no eval loss logged"),
             ("Throughput", _fmt(h["tokens_per_s"], "{:,.0f}"), "tokens/s, median over steps"),
             ("Eval before → after", *_eval_change(h["eval_before"], h["eval_after"])),
             ("Training time", _duration(h["train_s"]), "")]
    if h["early_stopping"]:
        cards.append(("Early stopping", *_early_stopping_card(h["early_stopping"])))
    html = "".join(f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{escape(value)}</div>'
                   f'<div class="detail">{escape(detail)}</div></div>' for label, value, detail in cards)
    return f'<section class="cards">{html}</section>'


def _early_stopping_card(stopping: dict[str, Any]) -> tuple[str, str]:
    """(value, detail) of the early-stopping card: where training ended and which step's adapter was kept."""
    ended = f"stopped at step {stopping['stopped_at']}" if stopping.get("stopped_early") else \
        f"ran to step {stopping['stopped_at']}"
    if stopping.get("best_step") is None:
        return ended, f"no finite {stopping['monitor']}: adapter from the last step"
    return ended, f"adapter from step {stopping['best_step']}: best {stopping['monitor']} {_fmt(stopping.get('best'))}"


def _comparison_table(runs: list[RunData]) -> str:
    rows = []
    for color, run in zip(run_colors(len(runs)), runs):
        h = headline(run)
        best = f"{_fmt(h['best_eval_loss'])} @ {h['best_eval_step']}" if h["best_eval_step"] is not None else "—"
        cells = [_fmt(h["steps"]), _fmt(h["final_loss"]), best, _fmt(h["tokens_per_s"], "{:,.0f}"),
                 _eval_change(h["eval_before"], h["eval_after"])[0], _duration(h["train_s"])]
        rows.append(f'<tr><td><span class="swatch" style="background:{color}"></span>{escape(run.name)}</td>'
                    + "".join(f'<td class="num">{escape(c)}</td>' for c in cells) + "</tr>")
    head = "".join(f'<th class="num">{h}</th>' for h in ("steps", "final loss", "best eval loss @ step", "tokens/s",
                                                          "eval before → after", "training time"))
    return f"<section><h2>Runs</h2><table><tr><th>run</th>{head}</tr>{''.join(rows)}</table></section>"


def _diagnosis_section(runs: list[RunData]) -> str:
    parts = []
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{escape(run.name)}</h3>")
        if run.diagnosis is None:
            parts.append(_note(run.notes.get("diagnosis", "no diagnosis.")))
        elif not run.diagnosis:
            parts.append(_note("the diagnosis found nothing to report."))
        parts += [_finding(f) for f in run.diagnosis or []]
    return f"<section><h2>Diagnosis</h2>{''.join(parts)}</section>"


def _finding(finding: dict[str, Any]) -> str:
    pattern = str(finding.get("pattern", "?"))
    tone = "good" if pattern == "healthy" else "bad" if pattern in SEVERE else ""
    evidence = finding.get("evidence")
    chips = "".join(f'<span class="chip mono">{escape(str(k))} = {escape(_fmt(v))}</span>'
                    for k, v in (evidence.items() if isinstance(evidence, dict) else []))
    advice = escape(str(finding.get("advice") or ""))
    return (f'<div class="finding {tone}"><div class="pattern">{escape(pattern.replace("_", " "))}</div>'
            f"<div>{advice}</div><div>{chips}</div></div>")


def _curves_section(panels: list[Panel], runs: list[RunData]) -> str:
    if not panels:
        notes = "; ".join(f"{r.name}: {r.notes['metrics']}" for r in runs if "metrics" in r.notes)
        return f"<section><h2>Training curves</h2>{_note(notes or 'no numeric metrics logged.')}</section>"
    figures = "".join(f"<figure><figcaption>{escape(p.title)}</figcaption>{_img(p.png, p.title)}</figure>"
                      for p in panels)
    return f'<section><h2>Training curves</h2><div class="grid">{figures}</div></section>'


def _evaluation_section(runs: list[RunData]) -> str:
    """Generation scores of the base model and the adapter, a row per run; the first run's sample replies."""
    heading = "<h2>Evaluation before → after</h2>"
    if len(runs) == 1 and not any(_evals(runs[0])):
        return f"<section>{heading}{_note(_eval_note(runs[0]))}</section>"
    rows = "".join(_score_row(run, len(runs) > 1) + _measure_row(run, len(runs) > 1) for run in runs)
    table = (f'<table><tr><th></th><th class="num">base model</th><th class="num">with adapter</th>'
             f'<th class="num">change</th></tr>{rows}</table>')
    samples = _samples(runs[0].name if len(runs) > 1 else "", *_evals(runs[0]))
    return f"<section>{heading}{table}{samples}</section>"


def _evals(run: RunData) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    summary = run.summary or {}
    return summary.get("eval_before"), summary.get("eval_after")


def _eval_note(run: RunData) -> str:
    return run.notes.get("evaluation") or run.notes.get("summary", "no evaluation.")


def _score_row(run: RunData, many: bool) -> str:
    before, after = _evals(run)
    if not (before or after):
        return f'<tr><td>{escape(run.name)}</td><td colspan="3">{_note(_eval_note(run))}</td></tr>'
    label = run.name if many else _metric_label(after or before)
    change = ""
    if before and after:
        points = 100 * (after["accuracy"] - before["accuracy"])
        change = f'<span class="{"up" if points >= 0 else "down"}">{points:+.1f} pts</span>'
    return (f'<tr><td>{escape(label)}</td><td class="num">{escape(_score(before))}</td>'
            f'<td class="num">{escape(_score(after))}</td><td class="num">{change}</td></tr>')


def _measure_row(run: RunData, many: bool) -> str:
    """The behaviour measure of a DPO run's greedy held-out replies (mean ± standard error), before and after."""
    before, after = (e.get("measure") if isinstance(e, dict) and isinstance(e.get("measure"), dict) else None
                     for e in _evals(run))
    if not (before or after):
        return ""
    name = (after or before).get("name", "measure")
    label = f"{run.name}: {name}" if many else f"{name} (greedy, {(after or before).get('total', '?')} replies)"
    cells = [f"{m['mean']:.3f} ± {m['stderr']:.3f}" if m and is_number(m.get("mean")) and is_number(m.get("stderr"))
             else "—" for m in (before, after)]
    change = ""
    if before and after and is_number(before.get("mean")) and is_number(after.get("mean")):
        delta = after["mean"] - before["mean"]
        change = f'<span class="{"up" if delta >= 0 else "down"}">{delta:+.3f}</span>'
    return (f'<tr><td>{escape(label)}</td><td class="num">{escape(cells[0])}</td>'
            f'<td class="num">{escape(cells[1])}</td><td class="num">{change}</td></tr>')


def _metric_label(evaluation: dict[str, Any]) -> str:
    """'json match' for a generation metric; DPO's held-out preference accuracy says what it counts."""
    metric = evaluation.get("metric", "")
    return "preference accuracy (chosen ranked above rejected)" if metric == "preference" else f"{metric} match"


def _samples(run_name: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    base, tuned = _replies(before), _replies(after)
    prompts = list(dict.fromkeys([*tuned, *base]))[:SAMPLES_SHOWN]
    if not prompts:
        return ""
    rows = "".join(f'<tr><td class="mono">{escape(p)}</td><td class="mono">{escape(base.get(p, "—"))}</td>'
                   f'<td class="mono">{escape(tuned.get(p, "—"))}</td></tr>' for p in prompts)
    heading = f"Samples ({escape(run_name)})" if run_name else "Samples"
    return f"<h3>{heading}</h3><table><tr><th>prompt</th><th>base model</th><th>with adapter</th></tr>{rows}</table>"


def _replies(evaluation: dict[str, Any] | None) -> dict[str, str]:
    samples = (evaluation or {}).get("samples") or []
    return {str(s.get("prompt")): str(s.get("reply")) for s in samples if isinstance(s, dict)}


def _eval_sets_section(runs: list[RunData]) -> str:
    """evaluation.sets: a row per named set (and per run when compared), accuracy +- one standard error before and
    after training; nothing when no run scored any set."""
    rows = []
    for run in runs:
        summary = run.summary or {}
        before, after = summary.get("eval_sets_before") or {}, summary.get("eval_sets_after") or {}
        for name in dict.fromkeys([*after, *before]):
            label = f"{run.name} · {name}" if len(runs) > 1 else name
            first, last = before.get(name), after.get(name)
            change = ""
            if first and last:
                points = 100 * (last["accuracy"] - first["accuracy"])
                change = f'<span class="{"up" if points >= 0 else "down"}">{points:+.1f} pts</span>'
            metric = (last or first).get("metric", "")
            rows.append(f'<tr><td>{escape(label)}</td><td>{escape(str(metric))}</td>'
                        f'<td class="num">{escape(str((last or first).get("total", "?")))}</td>'
                        f'<td class="num">{escape(_with_stderr(first))}</td>'
                        f'<td class="num">{escape(_with_stderr(last))}</td>'
                        f'<td class="num">{change}</td></tr>')
    notes = [f"{r.name}: {r.notes['eval_sets']}" for r in runs if "eval_sets" in r.notes]
    if not rows and not notes:
        return ""
    table = (f'<table><tr><th>eval set</th><th>metric</th><th class="num">n</th><th class="num">before</th>'
             f'<th class="num">after</th><th class="num">change</th></tr>{"".join(rows)}</table>' if rows else "")
    return (f"<section><h2>Evaluation sets: before / after ± SE</h2>{table}"
            f"{_note('± one binomial standard error, sqrt(p(1-p)/n).') if rows else ''}"
            f"{''.join(_note(n) for n in notes)}</section>")


def _with_stderr(result: dict[str, Any] | None) -> str:
    if not result:
        return "—"
    return f"{result['correct']}/{result['total']} ({result['accuracy']:.1%} ± {result['stderr']:.1%})"


def _forgetting_section(runs: list[RunData]) -> str:
    """The forgetting check's three figures against their thresholds, a row per run, then its warnings and a few
    changed answers of the first run; nothing when no run measured it."""
    measured = [(run, (run.summary or {}).get("forgetting")) for run in runs]
    notes = [f"{r.name}: {r.notes['forgetting']}" for r in runs if "forgetting" in r.notes]
    if not any(f for _, f in measured) and not notes:
        return ""
    rows = []
    for run, f in measured:
        if not f:
            continue
        thresholds = f.get("thresholds") or {}
        kl_warn, ppl_warn = thresholds.get("kl_per_token"), thresholds.get("ppl_ratio")
        kl_high = is_number(kl_warn) and f["kl_per_token"] > kl_warn
        ppl_high = is_number(ppl_warn) and f["ppl_ratio"] > ppl_warn
        rows.append(f'<tr><td>{escape(run.name)}</td>'
                    f'<td class="num{" down" if kl_high else ""}">{f["kl_per_token"]:.4f}</td>'
                    f'<td class="num{" down" if ppl_high else ""}">{f["ppl_ratio"]:.4f} '
                    f'({f["ppl_base"]:.2f} → {f["ppl_tuned"]:.2f})</td>'
                    f'<td class="num">{f["changed"]}/{f["prompts"]}</td></tr>')
    first = next((f for _, f in measured if f), None) or {}
    thresholds = first.get("thresholds") or {}
    limits = (f"warn above {thresholds['kl_per_token']} nats/token and a ratio of {thresholds['ppl_ratio']}"
              if is_number(thresholds.get("kl_per_token")) and is_number(thresholds.get("ppl_ratio")) else "")
    table = (f'<table><tr><th>run</th><th class="num">KL(base ‖ tuned), nats/token</th>'
             f'<th class="num">perplexity ratio on general text</th><th class="num">changed answers</th></tr>'
             f'{"".join(rows)}</table>{_note(limits) if limits else ""}' if rows else "")
    warnings = "".join(f'<div class="finding bad"><div>{escape(str(w))}</div></div>'
                       for w in first.get("warnings") or [])
    changed = [c for c in first.get("changed_samples") or [] if isinstance(c, dict)]
    samples = ("<h3>Changed answers</h3><table><tr><th>prompt</th><th>base model</th><th>with adapter</th></tr>"
               + "".join(f'<tr><td class="mono">{escape(str(c.get("prompt")))}</td>'
                         f'<td class="mono">{escape(str(c.get("base")))}</td>'
                         f'<td class="mono">{escape(str(c.get("tuned")))}</td></tr>' for c in changed)
               + "</table>") if changed else ""
    return (f"<section><h2>Forgetting check: base vs adapter on general prompts</h2>{warnings}{table}{samples}"
            f"{''.join(_note(n) for n in notes)}</section>")


def _adapter_section(runs: list[RunData], heatmaps: dict[str, bytes]) -> str:
    parts = []
    for run in runs:
        if len(runs) > 1:
            parts.append(f"<h3>{escape(run.name)}</h3>")
        if run.norms is None:
            parts.append(_note(run.notes.get("adapter", "no adapter.")))
            continue
        total = sum(n.norm ** 2 for n in run.norms) ** 0.5
        dora = " DoRA: the directional update s·B·A only; the magnitude vector is not included." if run.use_dora else ""
        parts.append(f'<p class="sub">{len(run.norms)} adapted modules; ‖s·B·A‖_F per module, '
                     f"total {total:.4g} (root of the sum of squares).{dora}</p>")
        parts.append(f'<div class="grid"><figure>{_img(heatmaps[run.name], f"adapter norms of {run.name}")}</figure>'
                     f"{_top_modules(run.norms)}</div>")
    return f"<section><h2>Adapter update by layer</h2>{''.join(parts)}</section>"


def _top_modules(norms: list[ModuleNorm]) -> str:
    top = sorted(norms, key=lambda n: n.norm, reverse=True)[:TOP_MODULES]
    rows = "".join(f'<tr><td class="mono">{escape(n.module)}</td><td class="num">{n.rank}</td>'
                   f'<td class="num">{n.scale:.3g}</td><td class="num">{n.norm:.4g}</td></tr>' for n in top)
    return (f'<div><h3 style="margin-top:0">Largest updates</h3><table><tr><th>module</th><th class="num">r</th>'
            f'<th class="num">scale</th><th class="num">‖s·B·A‖_F</th></tr>{rows}</table></div>')


def _config_section(runs: list[RunData]) -> str:
    main = runs[0]
    parts = [_config_differences(runs)] if len(runs) > 1 else []
    if main.config_text is None:
        parts.append(_note(main.notes.get("config", "no config.")))
    else:
        text = main.config_text if main.config is None else yaml.safe_dump(method_keys(main.config), sort_keys=False)
        parts.append(f"<details open><summary>{escape(main.name)}/{escape(main.folder.config.name)}</summary>"
                     f'<pre class="config">{escape(text)}</pre></details>')
    return f"<section><h2>Config</h2>{''.join(parts)}</section>"


def _config_differences(runs: list[RunData]) -> str:
    flat = [_flatten(method_keys(r.config or {})) for r in runs]
    keys = sorted({k for f in flat for k in f if k != "output_dir"})
    differing = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    if not differing:
        return _note("the compared runs have the same config (apart from output_dir).")
    head = "".join(f"<th>{escape(r.name)}</th>" for r in runs)
    rows = "".join(f'<tr><td class="mono">{escape(k)}</td>'
                   + "".join(f'<td class="mono">{escape(str(f[k]) if k in f else "—")}</td>' for f in flat) + "</tr>"
                   for k in differing)
    return f"<h3>Settings that differ</h3><table><tr><th>key</th>{head}</tr>{rows}</table>"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) and value else {name: value})
    return flat


def _eval_change(before: dict[str, Any] | None, after: dict[str, Any] | None) -> tuple[str, str]:
    """('0% → 100%', 'json match, 10 examples') for a card, or dashes."""
    if not (before or after):
        return "—", "no generation eval"
    first = f"{before['accuracy']:.0%}" if before else "—"
    last = f"{after['accuracy']:.0%}" if after else "—"
    ref = after or before
    return f"{first} → {last}", f"{_metric_label(ref)}, {ref.get('total', '?')} examples"


def _score(evaluation: dict[str, Any] | None) -> str:
    if not evaluation:
        return "—"
    return f"{evaluation['correct']}/{evaluation['total']} ({evaluation['accuracy']:.1%})"


def _fmt(value: Any, spec: str = "{:.4g}") -> str:
    if value is None:
        return "—"
    return spec.format(value) if isinstance(value, float) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


__all__ = ["render_page"]
