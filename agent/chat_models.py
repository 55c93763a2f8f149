"""Build the agent's chat model from settings: a local model, an OpenAI-compatible server, or any
LangChain chat model named by import path."""

from __future__ import annotations

import os
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from selftune.importing import import_object
from selftune.settings import ConfigError, ModelSettings

__all__ = ["OPENAI_PREFIX", "PY_PREFIX", "build_chat_model", "import_chat_model"]

OPENAI_PREFIX = "openai:"
PY_PREFIX = "py:"


def import_chat_model(spec: str) -> BaseChatModel:
    """``'module:attribute'``: a BaseChatModel instance, or a zero-argument factory returning one."""
    where = f"model.name 'py:{spec}'"
    target = import_object(spec, where)
    if not isinstance(target, BaseChatModel):
        if not callable(target):
            raise ConfigError(f"{where}: expected a chat model or a factory, got {target!r}")
        target = target()
    if not isinstance(target, BaseChatModel):
        raise ConfigError(f"{where}: the factory returned {type(target).__name__}, not a LangChain chat model")
    return target


def build_chat_model(settings: ModelSettings, cache_dir: Path) -> BaseChatModel:
    """``openai:<model>`` -> ``ChatOpenAI`` (vLLM, Ollama, llama.cpp servers); ``py:module:attribute`` ->
    that chat model (tuning needs a local one); else a ``LocalChatModel``."""
    if settings.name.startswith(PY_PREFIX):
        return import_chat_model(settings.name[len(PY_PREFIX):])
    if settings.name.startswith(OPENAI_PREFIX):
        from langchain_openai import ChatOpenAI

        model = settings.name[len(OPENAI_PREFIX):]
        if not model:
            raise ConfigError("model.name: 'openai:' needs a model name, e.g. 'openai:qwen2.5-coder'")
        return ChatOpenAI(
            model=model,
            base_url=settings.openai_base_url,
            api_key=os.environ.get(settings.openai_api_key_env, "not-needed"),
            temperature=settings.temperature,
            max_tokens=settings.max_new_tokens,
        )

    from selftune.agent.local_chat import LocalChatModel
    from selftune.agent.models import load_causal_lm

    model, tokenizer = load_causal_lm(settings.name, cache_dir, settings.dtype)
    return LocalChatModel(
        model=model,
        tokenizer=tokenizer,
        model_id=settings.name,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        threads=settings.threads,
        prefix_cache_entries=settings.prefix_cache_entries,
        jump_forward=settings.jump_forward,
        lookup_tokens=settings.lookup_tokens,
        fold_lora=settings.fold_lora,
    )
