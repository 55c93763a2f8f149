"""Build the agent's chat model from settings: a local model or an OpenAI-compatible server."""

from __future__ import annotations

import os
from pathlib import Path

from langchain_core.language_models import BaseChatModel

from selftune.settings import ConfigError, ModelSettings

__all__ = ["OPENAI_PREFIX", "build_chat_model"]

OPENAI_PREFIX = "openai:"


def build_chat_model(settings: ModelSettings, cache_dir: Path) -> BaseChatModel:
    """``openai:<model>`` -> ``ChatOpenAI`` (vLLM, Ollama, llama.cpp servers); else a ``LocalChatModel``."""
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
    )
