"""RunConfig: YAML + dotted overrides, unknown keys with suggestions, type and range errors naming the key."""

from __future__ import annotations

import pytest

from lorafit.config import ConfigError
from lorafit.run_config import load_run_config

BASE = """
model: tiny
output_dir: out
adapter: {r: 8, alpha: 16}
data: {train: train.jsonl}
training: {lr: 1e-3, max_steps: 5}
"""


def write(tmp_path, text=BASE):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_loads_and_applies_overrides(tmp_path):
    config = load_run_config(write(tmp_path), ["training.lr=5e-4", "adapter.target_modules=[q_proj, v_proj]",
                                               "data.packing=false"])
    assert config.training.lr == 5e-4 and config.training.max_steps == 5
    assert config.adapter.r == 8 and config.adapter.target_modules == ["q_proj", "v_proj"]
    assert config.data.packing is False


def test_distributed_defaults_and_overrides(tmp_path):
    default = load_run_config(write(tmp_path)).distributed
    assert (default.strategy, default.reshard_after_forward, default.cpu_offload, default.timeout_minutes) == \
        ("auto", True, False, 30.0)
    chosen = load_run_config(write(tmp_path), ["distributed.strategy=fsdp", "distributed.timeout_minutes=5"])
    assert chosen.distributed.strategy == "fsdp" and chosen.distributed.timeout_minutes == 5.0


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    assert load_run_config(write(tmp_path)).training.lr == 1e-3


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("training.lerning_rate=1", "unknown key 'training.lerning_rate'"),
        ("trainng.lr=1", "did you mean 'training'"),
        ("training.lrr=1", "did you mean 'lr'"),
        ("adapter.r=0", "adapter: r=0"),
        ("training.batch_size=abc", "training.batch_size='abc' should be int"),
        ("training.schedule=step", "training.schedule='step'"),
        ("training.micro_batch_size=3", "must divide training.batch_size=16"),
        ("evaluation.metric=bleu", "evaluation.metric='bleu'"),
        ("training.compile=fast", "training.compile='fast'"),
        ("training.release_host_memory=sometimes", "training.release_host_memory='sometimes'"),
        ("distributed.strategy=zero3", "distributed.strategy='zero3': use one of auto, ddp, fsdp"),
        ("distributed.timeout_minutes=0", "distributed.timeout_minutes=0.0 must be a positive"),
        ("distributed.cpu_offload=maybe", "distributed.cpu_offload='maybe' should be bool"),
        ("distributed.strategi=ddp", "did you mean 'strategy'"),
    ],
)
def test_errors_name_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path), [override])
    assert needle in str(err.value) and "run.yaml" in str(err.value)


def test_malformed_override():
    from lorafit.run_config import apply_override

    with pytest.raises(ConfigError, match="must look like key.path=value"):
        apply_override({}, "badoverride")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "model: [unclosed"))


def test_required_fields(tmp_path):
    with pytest.raises(ConfigError, match="model is required"):
        load_run_config(write(tmp_path, "data: {train: x.jsonl}"))
    with pytest.raises(ConfigError, match="data.train is required"):
        load_run_config(write(tmp_path, "model: m"))


def test_data_paths_resolve_beside_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "train.jsonl").write_text("{}")
    monkeypatch.chdir("/")
    assert load_run_config(write(tmp_path)).data.train == str(tmp_path / "train.jsonl")


@pytest.mark.parametrize(("overrides", "needle"), [
    (["adapter.init=loftq"], "also set quantize: nf4"),
    (["adapter.init=loftq", "quantize=nf4", "double_quant=false"], "set double_quant: true"),
    (["adapter.init=pissa", "quantize=nf4"], "needs a 16/32-bit base"),
    (["quantize=int4"], "quantize='int4'"),
])
def test_init_must_fit_the_base(tmp_path, overrides, needle):
    from lorafit.config import ConfigError
    from lorafit.run_config import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError, match=needle):
        load_run_config(path, overrides)


def test_evaluation_sets_short_and_long_form_resolve_beside_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "ood.jsonl").write_text("{}")
    monkeypatch.chdir("/")
    config = load_run_config(write(tmp_path, BASE + "evaluation: {sets: {in_distribution: ind.jsonl, "
                                                    "out_of_distribution: {path: ood.jsonl, metric: contains}}}\n"))
    sets = config.evaluation.sets
    assert list(sets) == ["in_distribution", "out_of_distribution"]
    assert (sets["in_distribution"].path, sets["in_distribution"].metric) == ("ind.jsonl", None)  # not found: kept
    assert (sets["out_of_distribution"].path, sets["out_of_distribution"].metric) == (str(tmp_path / "ood.jsonl"),
                                                                                      "contains")
    from lorafit.run_config import to_dict
    assert to_dict(config)["evaluation"]["sets"]["out_of_distribution"]["metric"] == "contains"
    assert load_run_config(write(tmp_path), ["evaluation.metric=contains", "training.neftune_noise_alpha=5"]
                           ).training.neftune_noise_alpha == 5.0


@pytest.mark.parametrize(("overrides", "needle"), [
    (["evaluation.sets=[a.jsonl]"], "evaluation.sets=['a.jsonl'] should be dict"),
    (["evaluation.sets.ood=3"], "evaluation: sets.ood=3 must be a file name"),
    (["evaluation.sets.ood.metric=bleu", "evaluation.sets.ood.path=o.jsonl"], "sets.ood.metric='bleu'"),
    (["evaluation.sets.ood.metric=exact"], "sets.ood: path is required"),
    (["evaluation.sets.ood.pth=o.jsonl"], "did you mean 'path'"),
    (["training.neftune_noise_alpha=-1"], "training.neftune_noise_alpha=-1.0 must be >= 0"),
    (["training.neftune_noise_alpha=x"], "training.neftune_noise_alpha='x' should be float or null"),
    (["training.neftune_noise_alpha=5", "method=grpo", "rewards=[r.py:f]"], "applies to method: sft only"),
])
def test_evaluation_sets_and_neftune_errors(tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path), overrides)
    assert needle in str(err.value) and "run.yaml" in str(err.value)


def test_added_tokens_must_be_distinct_strings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl, added_tokens: ['<a>', '<a>']}\n")
    with pytest.raises(ConfigError, match=r"data.added_tokens=\['<a>', '<a>'\]: use a list of distinct"):
        load_run_config(path)
    path.write_text("model: m\ndata: {train: t.jsonl, added_tokens: ['<a>']}\n"
                    "adapter: {trainable_token_indices: {embed_tokens: ['<a>', 5]}, modules_to_save: [lm_head]}\n")
    config = load_run_config(path)
    assert config.data.added_tokens == ["<a>"] and config.adapter.modules_to_save == ["lm_head"]
    assert config.adapter.trainable_token_indices == {"embed_tokens": ["<a>", 5]}
