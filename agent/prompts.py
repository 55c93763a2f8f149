"""Prompt templates kept in ``prompts.yaml`` and the rendering of tool schemas."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, StrictUndefined, Template
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

__all__ = ["render", "tool_signature"]

_TEMPLATES = Path(__file__).with_name("prompts.yaml")


@lru_cache(maxsize=1)
def _templates() -> dict[str, Template]:
    environment = Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
    raw = yaml.safe_load(_TEMPLATES.read_text())
    return {name: environment.from_string(text) for name, text in raw.items()}


def render(template: str, **variables: Any) -> str:
    """Render the template named ``template`` with ``variables``."""
    return _templates()[template].render(**variables).strip()


def tool_signature(tool: BaseTool | dict[str, Any]) -> str:
    """One-line JSON description of a LangChain tool or an OpenAI-style tool dict."""
    function = convert_to_openai_tool(tool)["function"]
    parameters = function.get("parameters", {})
    return json.dumps(
        {
            "name": function["name"],
            "description": function.get("description", "").strip(),
            "parameters": parameters.get("properties", {}),
            "required": parameters.get("required", []),
        },
        ensure_ascii=False,
    )
