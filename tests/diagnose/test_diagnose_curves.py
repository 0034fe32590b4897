"""Loss-curve diagnosis on synthetic noisy curves: each pattern is found, healthy curves are left alone."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import yaml

from lorafit.diagnose.curves import (
    STALL_FRAC,
    CurveMonitor,
    DiagnoseError,
    _blocks,
    _curve,
    diagnose_report,
    diagnose_rows,
    diagnose_run,
)
from lorafit.diagnose.findings import Finding

N = 200                       # logged steps per synthetic run
P = np.arange(1, N + 1) / N   # training progress of each row
SEEDS = range(5)
NOISE = 0.03                  # relative batch noise of the train loss (3%, typical of small-batch SFT)
EVAL_NOISE = 0.01             # a fixed eval set is far less noisy than one batch
LORA = {"adapter": {"r": 16, "alpha": 32, "use_rslora": False}, "training": {"lr": 1e-3, "max_steps": N}}
NF4 = {**LORA, "quantize": "nf4"}


def exp_decay(tau: float, start: float = 2.5, floor: float = 0.8) -> np.ndarray:
    return floor + (start - floor) * np.exp(-P / tau)


def power_law() -> np.ndarray:
    return 0.8 + 1.7 / (1 + P / 0.05)


def warmup_bump() -> np.ndarray:
    """Flat while the lr warms up over 5% of training, a small rise, then exponential descent."""
    return 0.8 + 1.7 * np.exp(-np.maximum(P - 0.05, 0) / 0.25) + 0.15 * np.exp(-(((P - 0.04) / 0.02) ** 2))


def early_plateau() -> np.ndarray:
    return 1.6 + 0.9 * np.exp(-P / 0.03)  # all of the descent in the first ~12%, then flat at 1.6


def stall_then_resume() -> np.ndarray:
    """Falls to 1.6 by 25%, flat until 50%, then a slow linear descent to 1.3 (the QLoRA stall)."""
    return np.where(P < 0.5, 1.6 + 0.9 * np.exp(-P / 0.06), 1.6 - 0.3 * (P - 0.5) / 0.5)


def overfit_eval() -> np.ndarray:
    return 1.2 + 1.3 * np.exp(-P / 0.15) + 0.8 * np.maximum(P - 0.4, 0)  # best near 40%, then rising


def stalled_eval() -> np.ndarray:
    return 1.2 + 1.3 * np.exp(-np.minimum(P, 0.4) / 0.15)  # falls until 40%, then flat


def rows(loss: np.ndarray, seed: int, *, eval_loss: np.ndarray | None = None, eval_every: int = 10,
         noise: float = NOISE) -> list[dict]:
    """Metrics rows as the trainer logs them, with multiplicative Gaussian noise on the losses."""
    rng = np.random.default_rng(seed)
    noisy = loss * (1 + noise * rng.standard_normal(N))
    out = [{"step": i + 1, "epoch": round((i + 1) / 100, 4), "loss": float(noisy[i]), "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 150.0, "tokens_seen": 300 * (i + 1)} for i in range(N)]
    if eval_loss is not None:
        noisy_eval = eval_loss * (1 + EVAL_NOISE * rng.standard_normal(N))
        for i in range(eval_every - 1, N, eval_every):
            out[i]["eval_loss"] = float(noisy_eval[i])
    return out


def with_spike(seed: int) -> list[dict]:
    out = rows(exp_decay(0.25), seed)
    for i in (120, 121):
        out[i]["loss"] += 1.5
        out[i]["grad_norm"] = 40.0
    return out


def with_nan(seed: int) -> list[dict]:
    out = rows(exp_decay(0.25), seed)
    out[150]["loss"] = math.nan
    out[150]["grad_norm"] = math.inf
    return out


def adapter(r: int, alpha: float, rslora: bool = False) -> dict:
    return {**LORA, "adapter": {"r": r, "alpha": alpha, "use_rslora": rslora}}


Case = Callable[[int], dict]
# name -> (expected patterns, seed -> diagnose_rows keyword arguments)
CASES: dict[str, tuple[set[str], Case]] = {
    "exp decay tau .2": ({"healthy"}, lambda s: {"rows": rows(exp_decay(0.2), s), "config": LORA}),
    "exp decay tau .3 + eval": ({"healthy"}, lambda s: {
        "rows": rows(exp_decay(0.3), s, eval_loss=exp_decay(0.3) + 0.15), "config": LORA}),
    "power law": ({"healthy"}, lambda s: {"rows": rows(power_law(), s), "config": LORA}),
    "warmup bump": ({"healthy"}, lambda s: {"rows": rows(warmup_bump(), s), "config": LORA}),
    "learned by 30% (quickstart)": ({"healthy"}, lambda s: {"rows": rows(exp_decay(0.08, 0.9, 0.01), s), "config": LORA}),
    "4-bit, healthy": ({"healthy"}, lambda s: {"rows": rows(exp_decay(0.25), s), "config": NF4}),
    "4-bit ~ 16-bit baseline": ({"healthy"}, lambda s: {
        "rows": rows(exp_decay(0.25), s), "config": NF4,
        "baseline_rows": rows(exp_decay(0.25), s + 100), "baseline_config": LORA}),
    "r=64 as fast as r=8": ({"healthy"}, lambda s: {
        "rows": rows(exp_decay(0.15), s), "config": adapter(64, 128),
        "baseline_rows": rows(exp_decay(0.15), s + 100), "baseline_config": adapter(8, 16)}),
    "rsLoRA r=64 alpha=16": ({"healthy"}, lambda s: {"rows": rows(exp_decay(0.2), s), "config": adapter(64, 16, True)}),
    "early plateau": ({"early_plateau"}, lambda s: {"rows": rows(early_plateau(), s), "config": LORA}),
    "r=64 slower than r=8": ({"sluggish_descent"}, lambda s: {
        "rows": rows(exp_decay(0.6), s), "config": adapter(64, 128),
        "baseline_rows": rows(exp_decay(0.15), s + 100), "baseline_config": adapter(8, 16)}),
    "alpha/r = 4/64": ({"sluggish_descent"}, lambda s: {"rows": rows(exp_decay(0.2), s), "config": adapter(64, 4)}),
    "eval rises": ({"divergent_validation"}, lambda s: {
        "rows": rows(exp_decay(0.3, floor=0.3), s, eval_loss=overfit_eval()), "config": LORA}),
    "eval stalls": ({"divergent_validation"}, lambda s: {
        "rows": rows(exp_decay(0.3, floor=0.3), s, eval_loss=stalled_eval()), "config": LORA}),
    "eval learned, replay rows keep the train loss up (quickstart)": ({"healthy"}, lambda s: {
        "rows": rows(early_plateau() / 1.6 * 0.14, s, eval_loss=exp_decay(0.05, 0.5, 0.011)), "config": LORA}),
    "same train loss, no eval": ({"early_plateau"}, lambda s: {"rows": rows(early_plateau() / 1.6 * 0.14, s),
                                                              "config": LORA}),
    "eval stalls near zero": ({"healthy"}, lambda s: {
        "rows": rows(exp_decay(0.3, floor=0.3), s, eval_loss=stalled_eval() / 12), "config": LORA}),
    "eval rises from near zero": ({"divergent_validation"}, lambda s: {
        "rows": rows(exp_decay(0.3, floor=0.3), s, eval_loss=overfit_eval() / 12), "config": LORA}),
    "4-bit stall, resume": ({"quantization_plateau"}, lambda s: {"rows": rows(stall_then_resume(), s), "config": NF4}),
    "4-bit gap to 16-bit": ({"quantization_plateau"}, lambda s: {
        "rows": rows(exp_decay(0.25) + 0.15, s), "config": NF4,
        "baseline_rows": rows(exp_decay(0.25), s + 100), "baseline_config": LORA}),
    "loss spike": ({"loss_spike"}, lambda s: {"rows": with_spike(s), "config": LORA}),
    "nan row": ({"nan"}, lambda s: {"rows": with_nan(s), "config": LORA}),
}


def test_each_pattern_is_detected_and_healthy_curves_stay_healthy():
    table = {}
    for name, (expected, make) in CASES.items():
        table[name] = [set(diagnose_rows(**make(seed)).patterns) for seed in SEEDS]
    width = max(map(len, CASES))
    print(f"\n{'case':<{width}}  {'expected':<22} detected ({len(SEEDS)} seeds)")
    for name, found in table.items():
        print(f"{name:<{width}}  {','.join(sorted(CASES[name][0])):<22} "
              f"{' | '.join(','.join(sorted(f)) for f in found)}")
    wrong = {name: found for name, found in table.items() if any(f != CASES[name][0] for f in found)}
    assert not wrong


def test_noise_and_block_standard_error_match_a_monte_carlo():
    """The 4-bit stall test weighs block medians by 1.2533 sigma / sqrt(k): check it, and the noise estimate,
    against the spread of block medians over 200 flat curves with 4% relative noise."""
    medians, predicted, noise = [], [], []
    for seed in range(200):
        flat = 1.5 * (1 + 0.04 * np.random.default_rng(seed).standard_normal(N))
        curve = _curve([{"step": i + 1, "loss": float(v)} for i, v in enumerate(flat)])
        blocks = _blocks(curve)
        medians.append(blocks.levels)
        predicted.append([blocks.se(j, curve.noise) for j in range(len(blocks.levels))])
        noise.append(curve.noise)
    # residuals around a rolling median are a little smaller than the noise (the window contains the point): <10% low
    assert np.mean(noise) == pytest.approx(0.04, rel=0.1)
    # the spread of 2000 medians is known to ~2%; the median of 20 values is not quite normal: 10% tolerance
    assert np.mean(predicted) == pytest.approx(np.std(medians, axis=0).mean(), rel=0.1)


def test_early_plateau_evidence_matches_the_curve():
    finding = _only(diagnose_rows(rows(early_plateau(), 0), LORA), "early_plateau")
    e = finding.evidence
    # the block medians estimate the true levels: 20 rows of 3% noise give a median within ~1.5% (3 sigma)
    assert e["knee_loss"] == pytest.approx(1.6, rel=0.015) and e["end_loss"] == pytest.approx(1.6, rel=0.015)
    assert e["start_loss"] == pytest.approx(early_plateau()[1], rel=0.06)  # median of the first 3 noisy rows
    assert e["knee_step"] == pytest.approx(0.25 * N, abs=1) and e["tail_drop_fraction"] < STALL_FRAC
    assert "adapter.r (e.g. to 32)" in finding.advice and "use_dora: true" in finding.advice


def test_sluggish_crossing_steps_follow_the_exponential():
    """f + A exp(-p / tau) reaches loss T at p = tau ln(A / (T - f)); T is half-way from the baseline's first rows
    (median of 3 = row 2) to its lowest loss (the last row): steps ~23 for tau 0.15 and ~91 for tau 0.6."""
    case = CASES["r=64 slower than r=8"][1](0)
    e = _only(diagnose_rows(**case), "sluggish_descent").evidence
    base = exp_decay(0.15)
    target = (base[1] + base[-1]) / 2
    assert e["target_loss"] == pytest.approx(target, rel=0.03)  # noisy first rows: 3% noise, median of 3

    def crossing(tau: float) -> float:
        return tau * math.log(1.7 / (target - 0.8)) * N

    assert e["baseline_steps"] == pytest.approx(crossing(0.15), abs=3)  # the rolling median moves it a few steps
    assert e["run_steps"] == pytest.approx(crossing(0.6), abs=6)  # a 4x flatter slope: twice the step error
    assert (e["r"], e["baseline_r"]) == (64, 8) and e["steps_ratio"] == pytest.approx(4, rel=0.2)


@pytest.mark.parametrize(("r", "alpha", "rslora", "scale", "fix"), [
    (64, 4, False, 4 / 64, "raise adapter.alpha to at least 32"),
    (256, 4, True, 4 / 16, "raise adapter.alpha to at least 8"),
])
def test_sluggish_from_a_tiny_scale_in_the_config(r, alpha, rslora, scale, fix):
    finding = _only(diagnose_rows(rows(exp_decay(0.2), 0)[:3], adapter(r, alpha, rslora)), "sluggish_descent")
    assert finding.evidence["scale"] == pytest.approx(scale) and fix in finding.advice
    assert ("use_rslora: true (scale 0.5)" in finding.advice) is (not rslora)  # 4/sqrt(64) = 0.5


def test_divergent_validation_names_the_best_step_and_the_checkpoint_before_it(tmp_path):
    metrics = rows(exp_decay(0.3, floor=0.3), 1, eval_loss=overfit_eval())
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    run = _write_run(tmp_path / "run", metrics, LORA)
    for step in (best_step - 30, best_step - 10, best_step + 20):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:08d}" / "trainer_state.pt").write_bytes(b"")
    (run / f"checkpoint-{best_step - 20}").mkdir()  # the layout of Hugging Face trainers
    finding = _only(diagnose_run(run), "divergent_validation")
    e = finding.evidence
    assert (e["best_eval_step"], e["best_eval_loss"]) == (best_step, pytest.approx(best_loss, rel=1e-4))
    assert e["checkpoint_step"] == best_step - 10 and e["checkpoint"] == f"checkpoints/step-{best_step - 10:08d}"
    assert e["eval_trend"] == "rising" and e["best_epoch"] == pytest.approx(best_step / 100, abs=0.01)
    assert e["checkpoint"] in finding.advice and "fewer epochs" in finding.advice

    (run / "checkpoints" / f"step-{best_step - 10:08d}" / "trainer_state.pt").unlink()  # incomplete: not offered
    assert diagnose_run(run).findings[0].evidence["checkpoint"] == f"checkpoint-{best_step - 20}"


def test_divergent_validation_advice_follows_early_stopping():
    """With evaluation.early_stopping on eval_loss the saved adapter is the best one already; without it (and without
    checkpoints) the advice offers early stopping."""
    metrics = rows(exp_decay(0.3, floor=0.3), 1, eval_loss=overfit_eval())
    stopping = {**LORA, "evaluation": {"every": 10, "early_stopping": {"patience": 3, "monitor": "eval_loss"}}}
    kept = _only(diagnose_rows(metrics, stopping), "divergent_validation").advice
    assert "the saved adapter is already the best evaluation's (evaluation.early_stopping)" in kept
    offered = _only(diagnose_rows(metrics, LORA), "divergent_validation").advice
    assert "set evaluation.early_stopping to stop there and keep the best adapter" in offered


@pytest.mark.parametrize(("case", "trend"), [("eval rises", "rising"), ("eval stalls", "stalled")])
def test_divergent_validation_tells_rising_from_stalled(case, trend):
    for seed in SEEDS:
        assert _only(diagnose_rows(**CASES[case][1](seed)), "divergent_validation").evidence["eval_trend"] == trend


def test_spike_and_nan_evidence_name_the_step():
    spike = _only(diagnose_rows(with_spike(2), LORA), "loss_spike").evidence
    assert spike["first_spike_step"] == 121 and spike["spike_steps"] == [121, 122] and spike["grad_norm"] == 40.0
    nan = _only(diagnose_rows(with_nan(2), LORA), "nan").evidence
    assert nan == {"first_step": 151, "fields": ["loss", "grad_norm"], "rows": 1,
                   "last_finite_loss": pytest.approx(with_nan(2)[149]["loss"], rel=1e-4)}


def test_quantization_gap_evidence_measures_the_injected_gap():
    e = _only(diagnose_rows(**CASES["4-bit gap to 16-bit"][1](3)), "quantization_plateau").evidence
    assert e["median_gap"] == pytest.approx(0.15, abs=0.03)  # noise of a smoothed difference: ~0.01 per row
    assert e["share_above_baseline"] >= 0.8


def test_quantization_advice_skips_what_the_run_already_uses():
    config = {**NF4, "adapter": {"r": 16, "alpha": 32, "init": "loftq"}}
    finding = _only(diagnose_rows(rows(stall_then_resume(), 0), config), "quantization_plateau")
    assert "use_dora: true" in finding.advice and "loftq" not in finding.advice


@pytest.mark.parametrize("shape", [[2.0, 2.0, 9.0, 2.0], [2.5, 1.0], [1.0, 1.1, 1.2, 1.3], [3.0]])
def test_very_short_runs_give_no_false_findings(shape):
    diagnosis = diagnose_rows([{"step": i + 1, "loss": v, "eval_loss": v} for i, v in enumerate(shape)], LORA)
    assert diagnosis.patterns == ["healthy"] and diagnosis.findings[0].evidence["rows"] == len(shape)


def test_missing_eval_loss_is_noted_and_not_guessed():
    metrics = [{k: v for k, v in r.items() if k != "eval_loss"}
               for r in rows(exp_decay(0.3, floor=0.3), 0, eval_loss=overfit_eval())]
    diagnosis = diagnose_rows(metrics, LORA)
    assert diagnosis.patterns == ["healthy"] and any("divergent_validation not checked" in n for n in diagnosis.notes)


def test_a_folder_with_only_metrics_works_and_the_json_is_strict(tmp_path):
    run = _write_run(tmp_path / "run", with_nan(0), None)
    text, as_json = diagnose_report(run)
    data = json.loads(as_json)
    assert list(data) == ["findings"]
    assert [set(f) for f in data["findings"]] == [{"pattern", "evidence", "advice"}]
    assert data["findings"][0]["pattern"] == "nan" and data["findings"][0]["evidence"]["first_step"] == 151
    assert "NaN" not in as_json and "Infinity" not in as_json
    assert data == diagnose_run(run).to_json()
    assert "nan" in text and "first_step=151" in text and "no run config" in text


def test_a_torn_last_line_is_skipped_and_a_bad_middle_line_is_named(tmp_path):
    run = _write_run(tmp_path / "run", rows(exp_decay(0.2), 0), LORA)
    clean = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 201, "loss": 0.8')  # a crash mid-write leaves a torn last line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:201: the last line is cut short"):
        assert diagnose_run(run).patterns == ["healthy"]
    (run / "metrics.jsonl").write_text(clean + '[1, 2]\n"text"\n{"step": 201, "loss": 0.8}\n')
    with pytest.raises(DiagnoseError, match=r"metrics.jsonl:201: expected a JSON object per line"):
        diagnose_run(run)


def test_baseline_folder(tmp_path):
    case = CASES["r=64 slower than r=8"][1](0)
    run = _write_run(tmp_path / "run", case["rows"], case["config"])
    base = _write_run(tmp_path / "base", case["baseline_rows"], case["baseline_config"])
    assert diagnose_run(run, base).patterns == ["sluggish_descent"]
    assert diagnose_run(run).patterns == ["healthy"]  # alone, a slow but steady descent is not a finding


def test_baseline_without_comparable_config_is_not_compared():
    case = CASES["r=64 slower than r=8"][1](0)
    for base_config in (None, adapter(128, 256), {**adapter(8, 16), "training": {"lr": 2e-4}}):
        diagnosis = diagnose_rows(case["rows"], case["config"], case["baseline_rows"], base_config)
        assert diagnosis.patterns == ["healthy"] and any("baseline" in n for n in diagnosis.notes)


def test_unreadable_runs_raise_clear_errors(tmp_path):
    with pytest.raises(DiagnoseError, match="does not exist"):
        diagnose_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiagnoseError, match="has no metrics.jsonl"):
        diagnose_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(DiagnoseError, match="no rows"):
        diagnose_run(tmp_path / "empty")
    run = _write_run(tmp_path / "bad", rows(exp_decay(0.2), 0), LORA)
    (run / "config.yaml").write_text("adapter: [r: 8\n")
    with pytest.raises(DiagnoseError, match="config.yaml: not valid YAML"):
        diagnose_run(run)


def test_unknown_config_keys_and_odd_values_are_tolerated():
    config = {"model": "x", "new_section": {"a": 1}, "adapter": {"r": "sixteen", "alpha": None}, "training": 3}
    assert diagnose_rows(rows(exp_decay(0.2), 0), config).patterns == ["healthy"]


def test_finding_rejects_an_unknown_pattern():
    with pytest.raises(ValueError, match="pattern='plateau' is unknown"):
        Finding("plateau", {}, "x")


def test_monitor_reports_each_pattern_once_and_nan_at_once():
    metrics = with_spike(4)
    metrics[170]["loss"] = math.nan
    with pytest.raises(ValueError, match="every=0 must be a positive integer"):
        CurveMonitor(every=0)
    monitor = CurveMonitor(adapter(64, 4))
    reported = [(row["step"], f.pattern) for row in metrics for f in monitor.observe(row)]
    assert [p for _, p in reported] == ["sluggish_descent", "loss_spike", "nan"]
    steps = {p: s for s, p in reported}
    assert steps["sluggish_descent"] == 1 and 121 <= steps["loss_spike"] <= 131 and steps["nan"] == 171


def test_monitor_holds_plateaus_back_until_half_of_the_planned_steps():
    def first_report(config):
        monitor = CurveMonitor(config)
        return next((row["step"] for row in rows(early_plateau(), 0) for f in monitor.observe(row)
                     if f.pattern == "early_plateau"), None)

    assert first_report({**LORA, "training": {"max_steps": N}}) >= N / 2
    assert first_report({**LORA, "training": {"max_steps": 10 * N}}) is None  # only 10% of the plan seen
    assert first_report(None) is not None  # no plan known: judged on the curve so far


def _only(diagnosis, pattern: str) -> Finding:
    assert diagnosis.patterns == [pattern], diagnosis.to_text()
    return diagnosis.findings[0]


def _write_run(folder, metrics, config):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder
