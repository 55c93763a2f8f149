"""What grammar-constrained tool calls cost against free decoding of the same length, side by side.

For each sampled BFCL question the local model first answers under the tool-call grammar
(greedy, as ``selftune eval bfcl`` does); then, on the same prompt, plain ``generate`` without
the grammar is made to produce exactly as many tokens (``min_new_tokens`` = ``max_new_tokens``),
so both runs make the same forward passes and differ only by the grammar's work: mask
computation, logits masking and the budget guard. Runs alternate, each pair ``--repeat`` times;
the per-question median is kept. Grammar compilation is timed apart (it is cached per tool set).

    .venv/bin/python benchmarks/constrained_overhead.py --model qwen2.5-coder-0.5b-instruct --limit 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch
from transformers import LogitsProcessorList

from selftune.agent.constrained import grammar_cache, openai_functions
from selftune.agent.chat_models import build_chat_model
from selftune.bfcl import load_category
from selftune.bfcl.harness import DEFAULT_MAX_NEW_TOKENS, build_messages
from selftune.settings import load_settings


def _prompt_ids(chat: Any, question: Any) -> torch.Tensor:
    prompt = chat.render_prompt(build_messages(question))
    return chat.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def _timed(model: Any, ids: torch.Tensor, **options: Any) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, temperature=None,
                                top_p=None, top_k=None, **options)
    return time.perf_counter() - start, int(output.shape[1] - ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--categories", nargs="+", default=["simple_python", "multiple", "live_simple"])
    parser.add_argument("--limit", type=int, default=20, help="questions per category (seeded sample)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    args = parser.parse_args()

    settings = load_settings(model={"name": args.model, "threads": args.threads})
    chat = build_chat_model(settings.model, settings.model_cache)
    model, tokenizer = chat.model, chat.tokenizer
    cache = grammar_cache(tokenizer, model.config.vocab_size)
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id

    rows: list[dict[str, Any]] = []
    for category in args.categories:
        for question, _ in load_category(category, limit=args.limit, seed=0):
            ids = _prompt_ids(chat, question)
            functions = openai_functions(question.tools())
            compile_start = time.perf_counter()
            cache.compile_tools(functions, allow_no_call=True)
            compile_s = time.perf_counter() - compile_start
            constrained, free = [], []
            tokens = 0
            for attempt in range(args.repeat + (0 if rows else 1)):  # one untimed warm-up pair first
                processor = cache.processor(functions, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, allow_no_call=True,
                                            stop_token_ids=eos)
                seconds, tokens = _timed(model, ids, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, pad_token_id=pad,
                                         logits_processor=LogitsProcessorList([processor]))
                constrained.append(seconds)
                seconds, same = _timed(model, ids, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad)
                assert same == tokens, (same, tokens)
                free.append(seconds)
            if not rows:
                constrained, free = constrained[1:], free[1:]
            rows.append({"category": category, "id": question.id, "prompt_tokens": int(ids.shape[1]),
                         "output_tokens": tokens, "compile_s": compile_s,
                         "constrained_s": statistics.median(constrained), "free_s": statistics.median(free)})

    total_constrained = sum(row["constrained_s"] for row in rows)
    total_free = sum(row["free_s"] for row in rows)
    ratios = [row["constrained_s"] / row["free_s"] for row in rows]
    result = {
        "model": args.model,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "questions": len(rows),
        "repeat": args.repeat,
        "output_tokens_mean": statistics.fmean(row["output_tokens"] for row in rows),
        "free_s_total": round(total_free, 3),
        "constrained_s_total": round(total_constrained, 3),
        "overhead_total": round(total_constrained / total_free - 1, 4),
        "overhead_median_call": round(statistics.median(ratios) - 1, 4),
        "overhead_p90_call": round(statistics.quantiles(ratios, n=10)[-1] - 1, 4) if len(ratios) > 1 else None,
        "compile_ms_median": round(1000 * statistics.median(row["compile_s"] for row in rows), 2),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    summary = {key: value for key, value in result.items() if key != "rows"}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
