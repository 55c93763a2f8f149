"""Agent-step latency on the local model: selftune's step against naive ``generate`` on the full prompt.

First the agent runs a fixed list of goals (greedy, real tools) and every model call it makes is
recorded: messages and generation arguments (plan calls, and grammar-constrained tool calls).
The first ``steps`` calls are then replayed in order, alternating two models over the same
weights: ``selftune`` (prefix KV-cache reuse on) and ``naive`` (``prefix_cache_entries=0``:
``transformers`` ``generate`` prefilling the whole prompt each call, with the same grammar, dtype
and greedy decoding). Decode speed is measured apart: 64 free tokens after a short prompt, minus
that prompt's one-token call.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import ChatResult

from selftune.agent.local_chat import LocalChatModel
from selftune.agent.loop import Agent
from selftune.agent.models import load_causal_lm
from selftune.memory.episodes import EpisodeStore
from selftune.settings import Settings, ToolSettings
from selftune.tools.registry import ToolContext, build_tools

__all__ = ["GOALS", "run_inference_bench"]

GOALS = [
    "What is 17*23+4? Use the calculator.",
    "Compute the sum of the squares of 1 to 12 with the python tool.",
    "How many seconds are there in 3 weeks? Use the calculator.",
    "Write 'hello selftune' to notes.txt, then read the file back and report its content.",
    "What is 2**20 divided by 64?",
    "List the files in the workspace and say how many there are.",
    "What is the remainder of 1000003 divided by 97? Use the calculator.",
    "Is 221 a prime number? Check with the python tool.",
]


class _Recorder(LocalChatModel):
    """A local model that keeps every call's messages and generation arguments."""

    calls: list[tuple[list[BaseMessage], dict[str, Any]]] = []

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        self.calls.append((list(messages), dict(kwargs, stop=stop)))
        return super()._generate(messages, stop=stop, run_manager=run_manager, **kwargs)


def _record_steps(model: Any, tokenizer: Any, settings: Settings, steps: int) -> list[tuple[list[BaseMessage], dict]]:
    recorder = _Recorder(model=model, tokenizer=tokenizer, model_id=settings.model.name, calls=[])
    tool_settings = ToolSettings(enabled=["calculator", "python", "read_file", "write_file", "list_files", "finish"])
    agent_settings = settings.agent.model_copy(update={"self_eval": False, "memory_top_k": 0})
    with tempfile.TemporaryDirectory(prefix="selftune-bench-inference-") as tmp:
        with EpisodeStore(Path(tmp) / "episodes.sqlite3") as store:
            agent = Agent(recorder, lambda episode_id: build_tools(ToolContext(
                workspace_dir=Path(tmp) / "workspace", memory=None, episode_id=episode_id, settings=tool_settings)),
                store, agent_settings)
            for goal in GOALS:
                if len(recorder.calls) >= steps:
                    break
                agent.run(goal)
    return recorder.calls[:steps]


def _decode_tokens_per_s(chat: LocalChatModel, tokens: int = 64) -> float:
    prompt = [HumanMessage(content="Count from one to one hundred in words, separated by commas.")]
    encoded = chat.tokenizer(chat.render_prompt(prompt), return_tensors="pt", add_special_tokens=False)

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            chat.model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                temperature=None, top_p=None, top_k=None, pad_token_id=chat.tokenizer.pad_token_id)
        return time.perf_counter() - start

    timed(2)  # warm-up
    one = statistics.median(timed(1) for _ in range(3))
    many = statistics.median(timed(tokens) for _ in range(2))
    return (tokens - 1) / (many - one)


def run_inference_bench(settings: Settings, steps: int = 20) -> dict[str, Any]:
    """Replay ``steps`` recorded agent calls on both paths and return timings, ratios and agreement."""
    model, tokenizer = load_causal_lm(settings.model.name, settings.model_cache, settings.model.dtype)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    calls = _record_steps(model, tokenizer, settings, steps)
    common = {"model": model, "tokenizer": tokenizer, "model_id": settings.model.name}
    fast = LocalChatModel(prefix_cache_entries=settings.model.prefix_cache_entries or 4, **common)
    naive = LocalChatModel(prefix_cache_entries=0, **common)
    rows = []
    for messages, options in calls:
        timings, outputs, prompt_tokens, output_tokens = {}, {}, 0, 0
        for name, chat in (("naive", naive), ("selftune", fast)):
            start = time.perf_counter()
            reply = chat.invoke(messages, **{k: v for k, v in options.items() if v is not None})
            timings[name] = time.perf_counter() - start
            outputs[name] = str(reply.content)
            prompt_tokens = reply.usage_metadata["input_tokens"]
            output_tokens = reply.usage_metadata["output_tokens"]
        rows.append({"kind": "tool call" if options.get("tools") else "text", "prompt_tokens": prompt_tokens,
                     "output_tokens": output_tokens, "naive_s": round(timings["naive"], 4),
                     "selftune_s": round(timings["selftune"], 4), "same_output": outputs["naive"] == outputs["selftune"]})
    naive_total = sum(row["naive_s"] for row in rows)
    fast_total = sum(row["selftune_s"] for row in rows)
    stats = fast.prefix_cache.stats
    return {
        "benchmark": "inference",
        "model": settings.model.name,
        "dtype": settings.model.dtype,
        "torch_threads": torch.get_num_threads(),
        "steps": len(rows),
        "naive_s_total": round(naive_total, 3),
        "selftune_s_total": round(fast_total, 3),
        "speedup": round(naive_total / fast_total, 2),
        "speedup_median_step": round(statistics.median(r["naive_s"] / r["selftune_s"] for r in rows), 2),
        "same_outputs": f"{sum(r['same_output'] for r in rows)}/{len(rows)}",
        "prompt_tokens_reused": stats.reused_tokens,
        "prompt_tokens_prefilled": stats.prefilled_tokens,
        "decode_tokens_per_s": round(_decode_tokens_per_s(naive), 2),
        "rows": rows,
    }
