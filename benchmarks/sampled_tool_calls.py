"""Sampled tool calls, as the self-improvement benchmark collects them: plain ``generate`` against the
drafting decoder (agent/speculative.py), side by side on the same prompts and seeds.

The workload is the collection phase's: train questions of the committed split and abstention goals
(another question's functions), each answered ``--attempts`` times under the tool-call grammar at
``--temperature``, with the no-call answer allowed. Each attempt runs on both variants in turn,
each after ``torch.manual_seed`` of the same seed, over the same weights and prefix cache settings:

* ``generate``: drafting off (``jump_forward`` false, no lookup), so sampling goes through
  ``transformers`` ``generate``, one forward pass per token: what collection ran before;
* ``drafted``: the defaults, where a sampled reply verifies grammar-forced and prompt-lookup tokens
  in one pass, one draw per token.

Both draw from the same distribution, so under the same seed the replies agree except where a
rounding difference between pass shapes changes a draw or the closing guard's bans.

    .venv/bin/python benchmarks/sampled_tool_calls.py --model smollm2-135m-instruct --questions 16 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from selftune.agent.generation import generate
from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm, resolve_dtype
from selftune.bench.self_improvement import SPLIT_FILE, Split, abstention_goals, train_questions
from selftune.bfcl.harness import build_messages
from selftune.settings import load_settings

VARIANTS = {"generate": {"jump_forward": False, "lookup_tokens": 0}, "drafted": {}}


def run(model_name: str, questions: int, attempts: int, temperature: float, max_tokens: int) -> dict[str, Any]:
    settings = load_settings(model={"name": model_name})
    model, tokenizer = load_causal_lm(model_name, settings.model_cache, settings.model.dtype)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    chats = {name: LocalChatModel(model=model, tokenizer=tokenizer, model_id=model_name, **options)
             for name, options in VARIANTS.items()}
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    train = train_questions(split)
    goals = [question for question, _ in train[:: max(1, len(train) // questions)][:questions]]
    goals += [question for question, _ in abstention_goals(split, max(1, questions // 4))]
    totals = {name: {"s": 0.0, "passes": 0, "tokens": 0} for name in chats}
    same = replies = 0
    for index, question in enumerate(tqdm(goals, desc="goals", unit="goal")):
        for attempt in range(attempts):
            texts = {}
            for name, chat in chats.items():
                torch.manual_seed(1000 * index + attempt)
                start = time.perf_counter()
                reply = generate(chat, build_messages(question), max_tokens=max_tokens, temperature=temperature,
                                 tools=question.tools(), allow_no_call=True)
                totals[name]["s"] += time.perf_counter() - start
                totals[name]["passes"] += reply.response_metadata["forward_passes"]
                totals[name]["tokens"] += reply.usage_metadata["output_tokens"]
                texts[name] = str(reply.content)
            same += texts["generate"] == texts["drafted"]
            replies += 1
    for entry in totals.values():
        entry["s"] = round(entry["s"], 2)
        entry["tokens_per_s"] = round(entry["tokens"] / entry["s"], 2)
    return {
        "benchmark": "sampled_tool_calls",
        "model": model_name,
        "dtype": resolve_dtype(settings.model.dtype),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "goals": len(goals),
        "attempts_per_goal": attempts,
        "temperature": temperature,
        "replies": replies,
        "same_replies": same,
        "variants": totals,
        "speedup": round(totals["generate"]["s"] / totals["drafted"]["s"], 2),
        "pass_ratio": round(totals["generate"]["passes"] / totals["drafted"]["passes"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=16,
                        help="train questions (plus a quarter as many abstention goals)")
    parser.add_argument("--attempts", type=int, default=3, help="sampled attempts per goal")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args()
    result = run(args.model, args.questions, args.attempts, args.temperature, args.max_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, entry in result["variants"].items():
        print(f"{name:9s} {entry['s']:8.1f} s  {entry['passes']:6d} passes  {entry['tokens']:6d} tokens  "
              f"{entry['tokens_per_s']:6.2f} tok/s")
    print(f"speedup {result['speedup']}x, passes {result['pass_ratio']}x fewer, "
          f"same replies {result['same_replies']}/{result['replies']}")


if __name__ == "__main__":
    main()
