"""LoRA training steps with logits on every position against logits on the target positions only.

An episode is mostly prompt (system text, function schemas, the question) and a short trained
reply, yet a causal-LM loss taken through ``model(labels=...)`` runs the language-model head, a
sequence x vocabulary product, and its gradient on every position. The trainer
(``tuning/trainer.py``) asks the model for logits at the target positions only
(``logits_to_keep``). Both variants run the same optimizer-free steps side by side, in turn, on the
same batches and dropout seeds, over the same LoRA weights:

* ``every_position``: ``transformers``' own loss, what the trainer ran before;
* ``target_positions``: the trainer's ``_accumulate``.

The examples are the collection phase's: the model's greedy replies to train questions of the
committed split, recorded as episodes as the self-improvement benchmark records them.

    .venv/bin/python benchmarks/train_step.py --model smollm2-135m-instruct --questions 24 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from statistics import fmean
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm

from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm, resolve_dtype
from selftune.bench.self_improvement import SPLIT_FILE, Split, record_attempt, train_questions
from selftune.memory.episodes import EpisodeStore
from selftune.settings import load_settings
from selftune.tuning import trainer
from selftune.tuning.dataset import SFTExample, build_examples, collate
from selftune.tuning.methods import get_method


def _every_position_step(model: PeftModel, batch: list[SFTExample], pad_token_id: int) -> float:
    """The step as it ran before: one example at a time, ``transformers``' token-mean loss over the
    logits of every position, weighted to the batch's token mean."""
    collated = [collate([example], pad_token_id) for example in batch]
    total = sum(trainer._target_tokens(inputs["labels"]) for inputs in collated)
    loss_sum = 0.0
    for inputs in collated:
        loss = model(**inputs).loss * (trainer._target_tokens(inputs["labels"]) / total)
        loss.backward()
        loss_sum += loss.item()
    return loss_sum


def _examples(chat: LocalChatModel, questions: int, max_seq_len: int) -> list[SFTExample]:
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    train = train_questions(split)
    with tempfile.TemporaryDirectory() as scratch, EpisodeStore(Path(scratch) / "episodes.db") as store:
        for question, answer in tqdm(train[: questions], desc="collecting", unit="goal"):
            record_attempt(store, chat, question, answer, temperature=0.0)
        episodes = store.scored(min_score=0.0)
    return build_examples(episodes, chat.tokenizer, max_seq_len)


def run(model_name: str, questions: int, batch_size: int, repeats: int) -> dict[str, Any]:
    settings = load_settings(model={"name": model_name})
    model, tokenizer = load_causal_lm(model_name, settings.model_cache, settings.model.dtype)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    chat = LocalChatModel(model=model, tokenizer=tokenizer, model_id=model_name)
    examples = _examples(chat, questions, settings.tuning.max_seq_len)
    batches = [examples[i: i + batch_size] for i in range(0, len(examples) - batch_size + 1, batch_size)]
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        peft_model = get_peft_model(model, get_method("lora").build(settings.tuning, None))
    steps = {
        "every_position": lambda batch: _every_position_step(peft_model, batch, pad_token_id),
        "target_positions": lambda batch: trainer._accumulate(
            peft_model, batch, 1, pad_token_id, torch.device("cpu")).item(),
    }
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    peft_model.train()  # dropout on, as in training: both variants draw the same masks per seed
    try:
        for repeat in range(repeats):
            for index, batch in enumerate(tqdm(batches, desc=f"steps (repeat {repeat + 1})", unit="batch")):
                for name, step in steps.items():
                    peft_model.zero_grad(set_to_none=True)
                    torch.manual_seed(index)
                    start = time.perf_counter()
                    loss = step(batch)
                    seconds[name].append(time.perf_counter() - start)
                    if repeat == 0:
                        losses[name].append(loss)
    finally:
        peft_model.base_model.unload()
    tokens = [sum(len(example.input_ids) for example in batch) for batch in batches]
    targets = [sum(trainer._target_tokens(collate([e], pad_token_id)["labels"]) for e in batch) for batch in batches]
    relative = [abs(a - b) / abs(a) for a, b in zip(losses["every_position"], losses["target_positions"])]
    variants = {name: {"s_per_step": round(fmean(values), 3), "total_s": round(sum(values), 2)}
                for name, values in seconds.items()}
    return {
        "benchmark": "train_step",
        "model": model_name,
        "dtype": resolve_dtype(settings.model.dtype),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "examples": len(examples),
        "batch_size": batch_size,
        "steps_per_variant": len(batches) * repeats,
        "mean_tokens_per_step": round(fmean(tokens), 1),
        "mean_target_tokens_per_step": round(fmean(targets), 1),
        "variants": variants,
        "speedup": round(variants["every_position"]["s_per_step"] / variants["target_positions"]["s_per_step"], 2),
        "max_relative_loss_difference": max(relative),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=24, help="train questions answered for the examples")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (tuning.batch_size)")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the batches per variant")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args()
    result = run(args.model, args.questions, args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for name, entry in result["variants"].items():
        print(f"{name:17s} {entry['s_per_step']:7.3f} s a step  ({entry['total_s']:.1f} s)")
    print(f"speedup {result['speedup']}x, largest relative loss difference "
          f"{result['max_relative_loss_difference']:.2e}")


if __name__ == "__main__":
    main()
