"""The parameter-efficient tuning methods selftune can train, by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peft import LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

from selftune.settings import TuningSettings

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A PEFT method: its default learning rate and how to build its config.

    ``build(settings, tokenizer_dir)``: ``tokenizer_dir`` is a directory holding
    tokenizer files, needed by methods that initialise from text (prompt tuning).
    """

    name: str
    default_lr: float
    build: Callable[[TuningSettings, str | None], PeftConfig]

    def learning_rate(self, settings: TuningSettings) -> float:
        return settings.learning_rate or self.default_lr


def _lora(settings: TuningSettings, tokenizer_dir: str | None) -> PeftConfig:
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_target_modules,
    )


def _prompt(settings: TuningSettings, tokenizer_dir: str | None) -> PeftConfig:
    if tokenizer_dir is None:
        raise ValueError("prompt tuning initialises from prompt_init_text and needs a tokenizer directory")
    return PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.prompt_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT,
        prompt_tuning_init_text=settings.prompt_init_text,
        tokenizer_name_or_path=tokenizer_dir,
    )


def _prefix(settings: TuningSettings, tokenizer_dir: str | None) -> PeftConfig:
    # Learned keys/values in every layer; the local chat model decodes them as a cache prefix.
    return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=settings.prompt_virtual_tokens)


METHODS: dict[str, Method] = {
    "lora": Method("lora", default_lr=2e-4, build=_lora),
    "prompt": Method("prompt", default_lr=2e-2, build=_prompt),
    "prefix": Method("prefix", default_lr=1e-2, build=_prefix),
}


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown tuning method {name!r}; valid: {', '.join(sorted(METHODS))}") from None
