"""Prefix KV-cache reuse on the local backend: same greedy outputs as without it, on the real SmolLM2.

The comparisons run in float32. In bfloat16, prefilling a prompt in two parts (cached head, new
tail) rounds differently from one pass (logits differ by up to ~0.2 on SmolLM2), so a greedy
choice between two near-equal tokens can flip; ``selftune bench inference`` reports how often
the bfloat16 outputs agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from langchain_core.messages import HumanMessage, SystemMessage
from peft import LoraConfig, get_peft_model

from selftune.agent.local_chat import LocalChatModel
from selftune.agent.loop import Agent
from selftune.agent.models import load_causal_lm
from selftune.agent.prefix_cache import PrefixCache
from selftune.memory.episodes import EpisodeStore
from selftune.settings import AgentSettings, ToolSettings
from selftune.tools.registry import ToolContext, build_tools

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def weights(model_cache: Path):
    return load_causal_lm(SMOL, model_cache, "float32")


def chat_model(weights, entries: int) -> LocalChatModel:
    model, tokenizer = weights
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL, prefix_cache_entries=entries)


def run_goal(chat: LocalChatModel, tmp_path: Path, name: str) -> list[tuple[str, str]]:
    settings = ToolSettings(enabled=["calculator", "finish"])
    with EpisodeStore(tmp_path / f"{name}.sqlite3") as store:
        agent = Agent(chat, lambda episode_id: build_tools(ToolContext(
            workspace_dir=tmp_path / name, memory=None, episode_id=episode_id, settings=settings)),
            store, AgentSettings(max_steps=3, self_eval=False, max_call_tokens=48, plan_max_tokens=32))
        result = agent.run("What is 17*23+4? Use the calculator.")
        return [(step.kind, step.message.content) for step in store.get(result.episode_id).steps]


def test_agent_steps_are_identical_with_and_without_the_cache(weights, tmp_path: Path) -> None:
    plain, cached = chat_model(weights, 0), chat_model(weights, 4)
    assert run_goal(cached, tmp_path, "cached") == run_goal(plain, tmp_path, "plain")

    stats = cached.prefix_cache.stats
    assert stats.calls >= 3 and stats.hits == stats.calls - 1  # every call after the first reuses a prefix
    assert stats.reused_tokens > stats.prefilled_tokens  # most of each later prompt was already there
    assert plain.prefix_cache.stats.hits == 0 and len(plain.prefix_cache) == 0

    # Another goal starts with the same system text and tool schemas: reused across goals too.
    reused_before = stats.reused_tokens
    assert run_goal(cached, tmp_path, "second") == run_goal(plain, tmp_path, "second-plain")
    assert stats.reused_tokens > reused_before


def test_a_changed_tool_set_reuses_only_the_shared_head(weights) -> None:
    plain, cached = chat_model(weights, 0), chat_model(weights, 4)
    calculator = {"name": "calculator", "description": "Evaluate arithmetic.",
                  "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                 "required": ["expression"]}}
    weather = {"name": "weather", "description": "Weather for a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

    def ask(chat: LocalChatModel, tools: list[dict]) -> str:
        system = ("You are a careful assistant. Answer the user's request with exactly one JSON tool call, "
                  "choosing the tool that fits and taking argument values from the request. Tools:\n"
                  + "\n".join(str(tool) for tool in tools))
        messages = [SystemMessage(content=system), HumanMessage(content="What is the weather in Oslo?")]
        return str(chat.invoke(messages, tools=tools, max_new_tokens=24).content)

    ask(cached, [calculator])
    prompt_tokens_before = cached.prefix_cache.stats.prefilled_tokens + cached.prefix_cache.stats.reused_tokens
    assert ask(cached, [weather]) == ask(plain, [weather])
    stats = cached.prefix_cache.stats
    prompt_tokens = stats.prefilled_tokens + stats.reused_tokens - prompt_tokens_before
    assert stats.hits == 1 and 30 < stats.reused_tokens < prompt_tokens - 20  # up to where the tools differ


def test_adapter_switch_clears_the_cache_and_outputs_stay_identical(weights, tmp_path: Path) -> None:
    model, _ = weights
    torch.manual_seed(0)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "v0001")
    lora.unload()  # take the LoRA layers out of the shared base model again

    plain, cached = chat_model(weights, 0), chat_model(weights, 4)
    messages = [SystemMessage(content="You are terse. " * 8), HumanMessage(content="Name three colours.")]
    base_reply = cached.invoke(messages, max_new_tokens=12).content
    assert len(cached.prefix_cache) == 1

    for chat in (plain, cached):
        chat.use_adapter(tmp_path / "v0001")
    assert len(cached.prefix_cache) == 0
    adapted = [chat.invoke(messages, max_new_tokens=12).content for chat in (cached, plain, cached)]
    assert adapted[0] == adapted[1] == adapted[2] != base_reply
    assert cached.prefix_cache.stats.hits == 1  # the third call reused the second's prefix under the adapter


def test_prefix_cache_keeps_the_most_recent_entries(weights) -> None:
    model, tokenizer = weights
    cache = PrefixCache(max_entries=2, min_tokens=4)
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"][0] for text in (
        "alpha beta gamma delta epsilon zeta eta theta", "one two three four five six seven eight",
        "red orange yellow green blue indigo violet black")]
    for ids in prompts:
        kv = cache.take(ids)
        with torch.inference_mode():
            model(ids[None, :-1], cache=kv, use_cache=True)
        cache.put(ids, kv)
    assert len(cache) == 2 and cache.stats.hits == 0
    assert cache.take(prompts[0]).get_seq_length() == 0  # evicted: a fresh cache
    assert cache.take(prompts[2]).get_seq_length() == prompts[2].numel() - 1  # all but the last token
    assert len(cache) == 1  # a taken entry is out until it is put back
