"""The composition root: builds each part from settings once, on first use."""

from __future__ import annotations

import logging
import re
from functools import cached_property

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool

from selftune.agent.loop import Agent
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import Episode, Reward
from selftune.memory.vector import VectorMemory
from selftune.settings import Settings
from selftune.tools.registry import ToolContext, build_tools
from selftune.tuning.adapters import AdapterRegistry

__all__ = ["Runtime", "RATINGS"]

log = logging.getLogger(__name__)

# User feedback: thumbs up is a user reward of 1.0, thumbs down 0.0.
RATINGS: dict[str, float] = {"+1": 1.0, "1": 1.0, "up": 1.0, "-1": 0.0, "down": 0.0}


class Runtime:
    """Holds the model, stores and registry of one data dir; parts load lazily."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)

    @cached_property
    def store(self) -> EpisodeStore:
        return EpisodeStore(self.settings.db_path, weights=dict(self.settings.rewards.weights))

    @cached_property
    def memory(self) -> VectorMemory:
        return VectorMemory(self.settings.chroma_dir, self.settings.memory.collection, self.settings.memory.embedding_model)

    @cached_property
    def adapters(self) -> AdapterRegistry:
        """Adapters of the configured model (an adapter fits only the base it was trained on)."""
        model_key = re.sub(r"[^A-Za-z0-9._-]+", "_", self.settings.model.name)
        return AdapterRegistry(self.settings.adapters_dir / model_key)

    @cached_property
    def model(self) -> BaseChatModel:
        from selftune.agent.chat_models import build_chat_model  # torch and weights load here

        model = build_chat_model(self.settings.model, self.settings.model_cache)
        self._apply_active_adapter(model)
        return model

    def tools(self, episode_id: str | None = None) -> list[BaseTool]:
        context = ToolContext(
            workspace_dir=self.settings.workspace_dir,
            memory=self.memory,
            episode_id=episode_id,
            settings=self.settings.tools,
        )
        return build_tools(context)

    def agent(self, sync: bool = True) -> Agent:
        """An agent on the model; with ``sync``, first switched to the registry's active adapter."""
        if sync:
            self.sync_adapter()
        return Agent(self.model, self.tools, self.store, self.settings.agent, memory=self.memory)

    def record_feedback(self, episode_id: str, rating: str, note: str | None = None) -> Episode:
        """Attach a user reward to an episode (id or unique prefix) and return it rescored.

        ValueError for a rating not in :data:`RATINGS`, KeyError for an unknown episode."""
        value = RATINGS.get(str(rating).strip().lower())
        if value is None:
            raise ValueError("rating must be +1 or -1 (or up/down)")
        episode = self.store.get(episode_id)
        self.store.add_reward(Reward(episode_id=episode.id, source="user", value=value, note=note))
        return self.store.get(episode.id)

    def sync_adapter(self) -> None:
        """Hot-swap the model to the registry's active adapter if they differ."""
        self._apply_active_adapter(self.model)

    def _apply_active_adapter(self, model: BaseChatModel) -> None:
        use_adapter = getattr(model, "use_adapter", None)
        if use_adapter is None:
            return
        active = self.adapters.active_version()
        if active != getattr(model, "adapter_version", None):
            log.info("switching model to adapter %s", active or "base")
            use_adapter(self.adapters.active_path(), active)
