"""Decoding with a LoRA adapter: PEFT's LoRA layers against the adapter folded into the weights
(agent/folded_lora.py), with the bare base model as the floor, side by side on the same questions.

The workload is the gate's evaluation: held-out questions of the committed split, greedy, under the
tool-call grammar with the no-call answer allowed. The model is loaded in float32 (folding applies
to float32 weights only). Each variant answers every question in turn over the same weights:

* ``base``: no adapter (what decoding costs without one);
* ``lora_layers``: the adapter as PEFT runs it, a LoRA layer around every targeted linear layer
  (``model.fold_lora: false``; what selftune ran before);
* ``folded``: the adapter folded into a copy of the weights it changes (the default).

``--adapter`` takes a saved LoRA adapter; without one, the tuning settings' LoRA config with small
random weights stands in (timing depends on the layers an adapter targets, not on its values).

Why bfloat16 models are not folded (``bf16_distance``): on up to 20 of the same prompts, the last
``DISTANCE_POSITIONS`` next-token distributions of the adapter in bfloat16, through PEFT's layers and
folded (in float32, then cast to bfloat16), and of the bare bfloat16 base model, each as KL from the
adapter's float32 distributions.

    .venv/bin/python benchmarks/folded_lora.py --model smollm2-135m-instruct --questions 30 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from selftune.agent.folded_lora import fold_lora
from selftune.agent.generation import generate
from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm
from selftune.bench.self_improvement import SPLIT_FILE, Split
from selftune.bfcl import load_category
from selftune.bfcl.harness import build_messages
from selftune.settings import load_settings
from selftune.tuning.methods import get_method

VARIANTS = ("base", "lora_layers", "folded")
DISTANCE_POSITIONS = 40


def _stand_in_adapter(model: torch.nn.Module, settings: Any, out_dir: Path) -> Path:
    """The settings' LoRA config with small random weights, saved to ``out_dir``; ``model`` is left bare."""
    torch.manual_seed(0)
    adapter = get_peft_model(model, get_method("lora").build(settings.tuning, None))
    for name, weight in adapter.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=1e-3)
    adapter.save_pretrained(out_dir)
    adapter.base_model.unload()
    return out_dir


def _last_log_probs(model: torch.nn.Module, prompts: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([torch.log_softmax(model(input_ids=ids).logits[0, -DISTANCE_POSITIONS:].float(), -1)
                          for ids in prompts])


def _bf16_distance(model_name: str, cache_dir: Path, adapter: Path, prompts: list[torch.Tensor]) -> dict[str, float]:
    """KL (per position) of the adapter's bfloat16 variants and the bare bfloat16 model from its float32 result."""
    def load(dtype: str) -> torch.nn.Module:
        return load_causal_lm(model_name, cache_dir, dtype)[0]

    def kl(reference: torch.Tensor, model: torch.nn.Module) -> float:
        other = _last_log_probs(model, prompts)
        return round(float(torch.nn.functional.kl_div(other, reference, log_target=True, reduction="batchmean")), 5)

    reference = _last_log_probs(PeftModel.from_pretrained(load("float32"), str(adapter)).eval(), prompts)
    folded = fold_lora(PeftModel.from_pretrained(load("float32"), str(adapter))).to(torch.bfloat16)
    return {"lora_layers_bf16": kl(reference, PeftModel.from_pretrained(load("bfloat16"), str(adapter)).eval()),
            "folded_bf16": kl(reference, folded),  # W + update summed in float32, then rounded once
            "no_adapter_bf16": kl(reference, load("bfloat16"))}


def run(model_name: str, questions: int, adapter_dir: Path | None, max_tokens: int) -> dict[str, Any]:
    settings = load_settings(model={"name": model_name})
    model, tokenizer = load_causal_lm(model_name, settings.model_cache, "float32")
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    asked = []
    for category, ids in split.heldout.items():
        wanted = set(ids[:questions // len(split.heldout)])
        asked += [question for question, _ in load_category(category) if question.id in wanted]
    totals = {name: {"s": 0.0, "passes": 0, "tokens": 0} for name in VARIANTS}
    replies: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        adapter = adapter_dir or _stand_in_adapter(model, settings, Path(scratch) / "stand-in")
        for name in VARIANTS:
            chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=model_name, fold_lora=name == "folded")
            chat.use_adapter(None if name == "base" else adapter)
            replies[name] = []
            for question in tqdm(asked, desc=name, unit="question"):
                start = time.perf_counter()
                reply = generate(chat, build_messages(question), max_tokens=max_tokens, temperature=0.0,
                                 tools=question.tools(), allow_no_call=True)
                totals[name]["s"] += time.perf_counter() - start
                totals[name]["passes"] += reply.response_metadata["forward_passes"]
                totals[name]["tokens"] += reply.usage_metadata["output_tokens"]
                replies[name].append(str(reply.content))
            chat.use_adapter(None)
        prompts = [tokenizer(chat.render_prompt(build_messages(question)), return_tensors="pt",
                             add_special_tokens=False)["input_ids"] for question in asked[:20]]
        distance = _bf16_distance(model_name, settings.model_cache, adapter, prompts)
    for entry in totals.values():
        entry["s"] = round(entry["s"], 2)
        entry["ms_per_pass"] = round(1000 * entry["s"] / entry["passes"], 1)
    return {
        "benchmark": "folded_lora",
        "model": model_name,
        "dtype": "float32",
        "adapter": str(adapter_dir) if adapter_dir else "stand-in (tuning settings' LoRA config)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "questions": len(asked),
        "variants": totals,
        "speedup_over_lora_layers": round(totals["lora_layers"]["s"] / totals["folded"]["s"], 2),
        "folded_over_base": round(totals["folded"]["s"] / totals["base"]["s"], 2),
        "same_replies": sum(a == b for a, b in zip(replies["lora_layers"], replies["folded"])),
        "bf16_distance": {"positions": sum(min(DISTANCE_POSITIONS, ids.shape[1]) for ids in prompts), **distance},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=30, help="held-out questions, split over the categories")
    parser.add_argument("--adapter", type=Path, help="a saved LoRA adapter (default: a stand-in)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args()
    result = run(args.model, args.questions, args.adapter, args.max_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, entry in result["variants"].items():
        print(f"{name:11s} {entry['s']:8.1f} s  {entry['passes']:6d} passes  {entry['ms_per_pass']:6.1f} ms/pass")
    print(f"folded {result['speedup_over_lora_layers']}x faster than LoRA layers, {result['folded_over_base']}x "
          f"the base model's time; same replies {result['same_replies']}/{result['questions']}")
    print("KL from the float32 adapter: " + ", ".join(f"{k} {v}" for k, v in result["bf16_distance"].items()))


if __name__ == "__main__":
    main()
