"""Only lorafit's UserError (and path / disk / YAML errors) print one line with exit 2; anything else is a bug:
traceback, a line saying so, exit 1. Every lorafit error type that reports bad input is a UserError."""

from __future__ import annotations

import errno
import json

import pytest
from safetensors.torch import save_file
from tiny_models import build_tiny

import lorafit
from lorafit.adapters import io
from lorafit.adapters.io import AdapterFileError
from lorafit.adapters.targets import TargetError
from lorafit.cli import main
from lorafit.config import ConfigError
from lorafit.data import DataError
from lorafit.data.chat import ChatTemplateError
from lorafit.diagnose import curves
from lorafit.diagnose.curves import DiagnoseError
from lorafit.diagnose.model_shape import ModelShapeError
from lorafit.errors import CheckpointError, UserError
from lorafit.evaluation.metrics import json_exact_match, score
from lorafit.models.load import ModelLoadError
from lorafit.models.zoo import ModelFetchError
from lorafit.quant import QuantDtypeError
from lorafit.quant.nf4 import QuantizationError
from lorafit.train.loop import TrainingDiverged
from lorafit.train.rewards import RewardError


@pytest.mark.parametrize("error_type", [ConfigError, TargetError, ModelShapeError, DataError, ChatTemplateError,
                                        AdapterFileError, CheckpointError, DiagnoseError, ModelLoadError,
                                        ModelFetchError, QuantizationError, QuantDtypeError, RewardError,
                                        TrainingDiverged])
def test_lorafit_input_errors_are_user_errors(error_type):
    assert issubclass(error_type, UserError) and issubclass(error_type, ValueError)


def _raise_in_diagnose(monkeypatch, error: BaseException) -> None:
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(curves, "diagnose_report", fail)


@pytest.mark.parametrize("error", [
    UserError("training.lr=-1 must be positive; e.g. training.lr=2e-4"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "data/train.jsonl"),
    PermissionError(errno.EACCES, "Permission denied", "/out"),
    IsADirectoryError(errno.EISDIR, "Is a directory", "run.yaml"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["user", "missing", "permission", "is-a-dir", "disk-full"])
def test_user_errors_print_one_line_with_exit_2(monkeypatch, capsys, error):
    _raise_in_diagnose(monkeypatch, error)
    assert main(["diagnose", "somewhere"]) == 2
    err = capsys.readouterr().err
    assert err == f"lorafit diagnose: error: {error}\n"


@pytest.mark.parametrize("error", [RuntimeError("shape mismatch inside lorafit"), KeyError("step"),
                                   ValueError("a plain ValueError is not lorafit's user error"),
                                   TypeError("unsupported operand"), OSError(errno.EIO, "Input/output error")],
                         ids=["runtime", "key", "value", "type", "io"])
def test_bugs_keep_their_traceback_and_say_so(monkeypatch, capsys, error):
    _raise_in_diagnose(monkeypatch, error)
    assert main(["diagnose", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "fail" in err
    assert err.strip().splitlines()[-1] == (f"lorafit diagnose: internal error ({type(error).__name__}): this is a bug "
                                           "in lorafit, not in your input; please report it with the traceback above.")


@pytest.mark.parametrize("override", ["training.lr=[1", "adapter: {r: 4"])
def test_bad_yaml_in_an_override_is_one_line(tmp_path, capsys, override):
    run = tmp_path / "run.yaml"
    run.write_text("model: nowhere\n")
    assert main(["check", str(run), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorafit check: error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(("content", "needle"), [(b"\xff\xfe\x00binary", "not valid YAML"),
                                                 (b"- a\n- b\n", "the top level must be a mapping")])
def test_run_files_that_are_not_yaml_mappings_are_one_line(tmp_path, capsys, content, needle):
    run = tmp_path / "run.yaml"
    run.write_bytes(content)
    assert main(["check", str(run)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(run) in err and "Traceback" not in err


def _adapter_folder(tmp_path):
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    return lorafit.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("value", [[{"peft_type": "LORA"}], "LORA", 3, None])
def test_an_adapter_config_that_is_not_an_object_is_named(tmp_path, value):
    folder = _adapter_folder(tmp_path)
    (folder / io.CONFIG_NAME).write_text(json.dumps(value))
    with pytest.raises(AdapterFileError, match=rf"{folder / io.CONFIG_NAME} holds a JSON \w+, not an object"):
        io.read_adapter_config(folder)


@pytest.mark.parametrize(("value", "kind"), [(float("nan"), "NaN"), (float("-inf"), "inf")])
def test_an_adapter_with_non_finite_weights_is_refused(tmp_path, value, kind):
    folder = _adapter_folder(tmp_path)
    weights = folder / io.WEIGHTS_NAME
    tensors = io.read_adapter_weights(folder)
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[-1] = value
    save_file(tensors, weights)
    with pytest.raises(AdapterFileError, match=rf"{weights}: tensor '{key}' holds {kind} values"):
        io.load_adapter(build_tiny("llama"), folder)


def test_evaluation_input_errors_are_user_errors():
    with pytest.raises(UserError, match="reference contains no JSON object"):
        json_exact_match("{}", "no json here")
    with pytest.raises(UserError, match="unknown metric 'bleu'"):
        score(["a"], ["a"], "bleu")
    with pytest.raises(ValueError) as err:  # a caller bug stays a plain ValueError
        score(["a"], [], "exact")
    assert not isinstance(err.value, UserError)
