"""bfloat16 against float32 on this CPU: what `model.dtype: auto` chooses between.

    .venv/bin/python benchmarks/dtype.py [--model smollm2-135m-instruct] [--json]

In one run, on the same prompt, for each dtype: prefill of a long prompt (what dominates a
grammar-constrained tool call with tool schemas in the prompt), cached greedy decoding, and one
LoRA optimizer step (the default LoRA config, forward and backward on 2 x 256 tokens). Prints the
seconds and the bf16/fp32 speed ratio of each, the CPU capability torch reports and what `auto`
resolves to here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated

import torch
import typer
from peft import get_peft_model

from selftune.agent.models import load_causal_lm, resolve_dtype
from selftune.settings import load_settings
from selftune.tuning.methods import get_method

DTYPES = ("bfloat16", "float32")


def _best_of(repeats: int, run: Callable[[], None]) -> float:
    """Least seconds over ``repeats`` calls of ``run`` (after one warm-up call)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _measure(model_name: str, dtype: str, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict[str, float]:
    settings = load_settings(model={"name": model_name})
    model, _ = load_causal_lm(model_name, settings.model_cache, dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt_tokens), generator=generator)

    def prefill() -> None:
        with torch.inference_mode():
            model(ids)

    def decode() -> None:
        with torch.inference_mode():
            model.generate(ids[:, :64], max_new_tokens=decode_tokens, min_new_tokens=decode_tokens, do_sample=False)

    peft_model = get_peft_model(model, get_method("lora").build(settings.tuning, None))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    batch = ids[:, :256].repeat(2, 1)

    def lora_step() -> None:
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with peft_model.disable_adapter():
        timings = {"prefill_s": _best_of(repeats, prefill), "decode_s": _best_of(repeats, decode)}
    peft_model.train()
    timings["lora_step_s"] = _best_of(repeats, lora_step)
    timings["decode_tokens_per_s"] = decode_tokens / timings["decode_s"]
    typer.echo(f"{dtype}: {timings}", err=True)
    return {name: round(value, 3) for name, value in timings.items()}


def main(
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m-instruct",
    prompt_tokens: Annotated[int, typer.Option(min=256, help="Prompt length for prefill.")] = 1024,
    decode_tokens: Annotated[int, typer.Option(min=1, help="Greedy tokens to decode.")] = 32,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the best counts).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
) -> None:
    rows = {dtype: _measure(model, dtype, prompt_tokens, decode_tokens, repeats) for dtype in DTYPES}
    speedup = {
        name: round(rows["float32"][name] / rows["bfloat16"][name], 2)
        for name in ("prefill_s", "decode_s", "lora_step_s")
    }
    result = {
        "benchmark": "dtype",
        "model": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto": resolve_dtype("auto"),
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "dtypes": rows,
        "bf16_speedup": speedup,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    typer.echo(f"{model}, CPU {result['cpu_capability']}, {result['torch_threads']} threads; auto = {result['auto']}")
    typer.echo("| phase | bfloat16 s | float32 s | bf16 speedup |")
    typer.echo("| --- | ---: | ---: | ---: |")
    for name, ratio in speedup.items():
        typer.echo(f"| {name.removesuffix('_s')} | {rows['bfloat16'][name]} | {rows['float32'][name]} | {ratio}x |")


if __name__ == "__main__":
    typer.run(main)
