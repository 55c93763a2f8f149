"""Agent-step latency on the local model: selftune's step against naive ``generate`` on the full prompt.

First the agent runs a fixed list of goals (greedy, real tools) and every model call it makes is
recorded: messages and generation arguments (plan calls, and grammar-constrained tool calls).
The first ``steps`` calls are then replayed in order, each call on every variant in turn, all
over the same weights, dtype and grammar:

* ``naive``: ``transformers`` ``generate`` prefilling the whole prompt, one forward pass per token;
* ``prefix_cache``: prefix KV-cache reuse only;
* ``jump_forward``: plus grammar-forced tokens verified in one pass (agent/speculative.py);
* ``lookup``: plus up to 8 prompt-lookup tokens per pass.

``selftune`` names the variant the settings select (``model.jump_forward``, ``model.lookup_tokens``).
Decode speed is measured apart: 64 free tokens after a short prompt, minus that prompt's one-token
call; where ``llama-cpp-python`` is installed (it is not a dependency), the same GGUF runs on
llama.cpp with the same thread count as the CPU reference.
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
from selftune.agent.models import load_causal_lm, resolve_dtype
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


VARIANTS: dict[str, dict[str, Any]] = {
    "naive": {"prefix_cache": False, "jump_forward": False, "lookup_tokens": 0},
    "prefix_cache": {"prefix_cache": True, "jump_forward": False, "lookup_tokens": 0},
    "jump_forward": {"prefix_cache": True, "jump_forward": True, "lookup_tokens": 0},
    "lookup": {"prefix_cache": True, "jump_forward": True, "lookup_tokens": 8},
}


def _selected_variant(settings: Settings) -> str:
    model = settings.model
    if not model.jump_forward:
        return "prefix_cache"
    return "lookup" if model.lookup_tokens else "jump_forward"


def _llama_cpp_decode_tokens_per_s(settings: Settings, threads: int, tokens: int = 64) -> dict[str, Any]:
    """llama.cpp's decode speed on the model's own GGUF file, measured like :func:`_decode_tokens_per_s`."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        return {"available": False, "reason": f"llama-cpp-python is not importable ({error}); it is not a dependency"}
    from selftune.agent.models import assemble_chunks, get_spec

    spec = get_spec(settings.model.name)
    if spec.source not in ("gguf_file", "gguf_chunks"):
        return {"available": False, "reason": f"{spec.name} has no GGUF file"}
    with tempfile.TemporaryDirectory(prefix="selftune-bench-gguf-") as tmp:
        files = [weight.locate() for weight in spec.files]
        gguf = files[0] if spec.source == "gguf_file" else assemble_chunks(files, Path(tmp) / "model.gguf", spec.sha256)
        llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=512, verbose=False)
        prompt = llm.tokenize(b"Count from one to one hundred in words, separated by commas.")

        def timed(new_tokens: int) -> float:
            llm.reset()
            start = time.perf_counter()
            for count, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
                if count >= new_tokens:
                    break
            return time.perf_counter() - start

        timed(2)
        one = statistics.median(timed(1) for _ in range(3))
        many = statistics.median(timed(tokens) for _ in range(2))
    return {"available": True, "gguf": gguf.name, "decode_tokens_per_s": round((tokens - 1) / (many - one), 2)}


def run_inference_bench(settings: Settings, steps: int = 20) -> dict[str, Any]:
    """Replay ``steps`` recorded agent calls on every variant and return timings, ratios and agreement."""
    model, tokenizer = load_causal_lm(settings.model.name, settings.model_cache, settings.model.dtype)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    calls = _record_steps(model, tokenizer, settings, steps)
    entries = settings.model.prefix_cache_entries or 4
    chats = {
        name: LocalChatModel(model=model, tokenizer=tokenizer, model_id=settings.model.name,
                             prefix_cache_entries=entries if variant["prefix_cache"] else 0,
                             jump_forward=variant["jump_forward"], lookup_tokens=variant["lookup_tokens"])
        for name, variant in VARIANTS.items()
    }
    rows = []
    for messages, options in calls:
        row: dict[str, Any] = {"kind": "tool call" if options.get("tools") else "text"}
        outputs = {}
        for name, chat in chats.items():
            start = time.perf_counter()
            reply = chat.invoke(messages, **{k: v for k, v in options.items() if v is not None})
            row[f"{name}_s"] = round(time.perf_counter() - start, 4)
            row[f"{name}_passes"] = reply.response_metadata["forward_passes"]
            outputs[name] = str(reply.content)
            row["prompt_tokens"] = reply.usage_metadata["input_tokens"]
            row["output_tokens"] = reply.usage_metadata["output_tokens"]
        row["same_output"] = {name: outputs[name] == outputs["naive"] for name in chats if name != "naive"}
        rows.append(row)

    def summary(name: str) -> dict[str, Any]:
        total = sum(row[f"{name}_s"] for row in rows)
        naive_total = sum(row["naive_s"] for row in rows)
        calls_ = [row for row in rows if row["kind"] == "tool call"]
        return {
            "s_total": round(total, 3),
            "speedup": round(naive_total / total, 2),
            "speedup_median_step": round(statistics.median(r["naive_s"] / r[f"{name}_s"] for r in rows), 2),
            "speedup_median_tool_call": round(statistics.median(r["naive_s"] / r[f"{name}_s"] for r in calls_), 2)
            if calls_ else None,
            "forward_passes": sum(row[f"{name}_passes"] for row in rows),
            "same_outputs": "-" if name == "naive" else f"{sum(r['same_output'][name] for r in rows)}/{len(rows)}",
        }

    variants = {name: summary(name) for name in chats}
    selected = _selected_variant(settings)
    stats = chats[selected].prefix_cache.stats
    decode = _decode_tokens_per_s(chats["naive"])
    llama_cpp = _llama_cpp_decode_tokens_per_s(settings, torch.get_num_threads())
    return {
        "benchmark": "inference",
        "model": settings.model.name,
        "dtype": resolve_dtype(settings.model.dtype),
        "torch_threads": torch.get_num_threads(),
        "steps": len(rows),
        "output_tokens": sum(row["output_tokens"] for row in rows),
        "selftune_variant": selected,
        "naive_s_total": variants["naive"]["s_total"],
        "selftune_s_total": variants[selected]["s_total"],
        "speedup": variants[selected]["speedup"],
        "speedup_median_step": variants[selected]["speedup_median_step"],
        "same_outputs": variants[selected]["same_outputs"],
        "variants": variants,
        "prompt_tokens_reused": stats.reused_tokens,
        "prompt_tokens_prefilled": stats.prefilled_tokens,
        "decode_tokens_per_s": round(decode, 2),
        "llama_cpp": llama_cpp,
        "decode_vs_llama_cpp": round(llama_cpp["decode_tokens_per_s"] / decode, 2) if llama_cpp["available"] else None,
        "rows": rows,
    }
