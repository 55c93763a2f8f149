"""Where a model decides between calling a tool and the no-call answer, base weights against an adapter.

    .venv/bin/python benchmarks/no_call_margins.py --adapter WORK_DIR/adapters/v0001 [--out F.json]

At the tool-name position (the prompt, then ``{"tool": "``) the margin is the log-probability of
the first token of ``none`` minus the best first token of an offered function's name: above zero
the greedy reply is the no-call answer. Printed per model: the share of questions refused in
each set (held-out train-category questions, which want a call; BFCL irrelevance, and the
benchmark's own abstention goals and, with ``--near-miss-goals``, its near-miss goals, which want
none), how well the margin separates them (AUC), and what a bias added to the margin would
trade. One forward pass per question (the sets of ``selftune bench self-improvement``: the
committed split, 50 seeded irrelevance questions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from selftune.agent.constrained import NO_CALL_TOOL
from selftune.bench.self_improvement import SPLIT_FILE, Split, _local_chat, abstention_goals, widen_train
from selftune.bfcl import BfclQuestion, load_category
from selftune.bfcl.harness import build_messages
from selftune.settings import load_settings

BIASES = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0)


def _margin(chat, question: BfclQuestion) -> float:
    prompt = chat.render_prompt(build_messages(question)) + '{"tool": "'
    ids = chat.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        scores = chat.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)

    def first(name: str) -> float:
        return scores[chat.tokenizer(name, add_special_tokens=False)["input_ids"][0]].item()

    return first(NO_CALL_TOOL) - max(first(tool["function"]["name"]) for tool in question.tools())


def _auc(refusing: list[float], calling: list[float]) -> float:
    """Probability that a question wanting no call has the larger margin than one wanting a call."""
    pairs = [(a > b) + 0.5 * (a == b) for a in refusing for b in calling]
    return sum(pairs) / len(pairs)


def main(
    adapter: Annotated[Path, typer.Option(help="Adapter directory to compare with the base weights.")],
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m-instruct",
    abstain_goals: Annotated[int, typer.Option(help="Benchmark abstention goals to include.")] = 40,
    near_miss_goals: Annotated[int, typer.Option(help="Benchmark near-miss abstention goals to include.")] = 0,
    train_per_category: Annotated[Optional[int], typer.Option(help="The run's --train-per-category, if any.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write every margin as JSON.")] = None,
) -> None:
    settings = load_settings(model={"name": model})
    chat = _local_chat(settings)
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    if train_per_category is not None:
        split = widen_train(split, train_per_category)
    sets = {
        "heldout": [q for c, ids in split.heldout.items() for q, _ in load_category(c) if q.id in set(ids)],
        "irrelevance": [q for q, _ in load_category("irrelevance", limit=50, seed=settings.tuning.seed)],
    }
    goals = [q for q, _ in abstention_goals(split, abstain_goals, near_miss_goals, settings.memory.embedding_model)]
    sets["abstention goals"] = [q for q in goals if q.id.endswith("~none")]
    if near_miss_goals:
        sets["near-miss goals"] = [q for q in goals if q.id.endswith("~near")]
    margins: dict[str, dict[str, list[float]]] = {}
    for label, path in (("base", None), ("adapter", adapter)):
        chat.use_adapter(path, path.name if path else None)
        margins[label] = {name: [_margin(chat, q) for q in questions] for name, questions in sets.items()}
    typer.echo("| model | bias | " + " | ".join(f"{name} refused" for name in sets) + " |")
    typer.echo("| --- | ---: | " + " | ".join("---:" for _ in sets) + " |")
    for label, by_set in margins.items():
        for bias in BIASES:
            shares = [sum(m + bias > 0 for m in values) / len(values) for values in by_set.values()]
            typer.echo(f"| {label} | {bias:+.1f} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
    for label, by_set in margins.items():
        typer.echo(f"{label}: AUC irrelevance vs held-out {_auc(by_set['irrelevance'], by_set['heldout']):.3f}, "
                   f"abstention goals vs held-out {_auc(by_set['abstention goals'], by_set['heldout']):.3f}")
    if out is not None:
        out.write_text(json.dumps(margins))


if __name__ == "__main__":
    typer.run(main)
