"""Where a model decides between calling a tool and the no-call answer, base weights against an adapter.

    .venv/bin/python benchmarks/no_call_margins.py --adapter WORK_DIR/adapters/v0001 [--out F.json]

While the greedy reply chooses its tool, the margin (:func:`selftune.tuning.calibration.no_call_margin`)
is the largest gap between the best token that chooses ``none`` and the best other admissible
token: above zero the greedy reply is the no-call answer. Printed per model: the share of questions refused in each set (held-out
train-category questions, which want a call; BFCL irrelevance and live_irrelevance, and the
benchmark's own abstention goals and, with ``--near-miss-goals``, its near-miss goals, and with
``--calibration`` the no-call calibration's held-back live_irrelevance questions, which want
none), how well the margin separates them (AUC), and what a no-call bias added to the margin
would trade, including the held-out questions still solved: those whose greedy call with the
no-call answer withheld passes the checker and whose biased margin stays below zero (a bias
changes only the call-or-not choice). A few decoding steps per question and one generation per
held-out question (the sets of ``selftune bench self-improvement``: the committed split, 50
seeded questions per irrelevance category). Margins are raw: an adapter's saved bias is one row of
the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from selftune.agent.generation import generate
from selftune.bench.self_improvement import (
    SPLIT_FILE,
    Split,
    _local_chat,
    abstention_goals,
    calibration_goals,
    widen_train,
)
from selftune.bfcl import BfclAnswer, BfclQuestion, load_category
from selftune.bfcl.harness import build_messages, score_reply
from selftune.settings import load_settings
from selftune.tuning.calibration import no_call_margin, refusal_share

EVAL_LIMIT = 50  # questions per irrelevance suite, as the benchmark evaluates by default
BIASES = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def _solved_with_call_required(chat, question: BfclQuestion, answer: BfclAnswer | None) -> bool:
    reply = generate(chat, build_messages(question), max_tokens=256, temperature=0.0, tools=question.tools(),
                     allow_no_call=False)
    return score_reply(question, answer, str(reply.content))[2].valid


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
    calibration: Annotated[int, typer.Option(help="The benchmark's no-call calibration questions to include "
                                                  "(held-back live_irrelevance).")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Write every margin as JSON.")] = None,
) -> None:
    settings = load_settings(model={"name": model})
    chat = _local_chat(settings)
    split = Split.model_validate_json(SPLIT_FILE.read_text())
    if train_per_category is not None:
        split = widen_train(split, train_per_category)
    heldout = [(q, a) for c, ids in split.heldout.items() for q, a in load_category(c) if q.id in set(ids)]
    sets = {"heldout": [q for q, _ in heldout]}
    for category in ("irrelevance", "live_irrelevance"):
        sets[category] = [q for q, _ in load_category(category, limit=EVAL_LIMIT, seed=settings.tuning.seed)]
    goals = [q for q, _ in abstention_goals(split, abstain_goals, near_miss_goals, settings.memory.embedding_model)]
    sets["abstention goals"] = [q for q in goals if q.id.endswith("~none")]
    if near_miss_goals:
        sets["near-miss goals"] = [q for q in goals if q.id.endswith("~near")]
    if calibration:
        sets["calibration"] = calibration_goals(split, calibration, EVAL_LIMIT, settings.tuning.seed)[0]
    margins: dict[str, dict[str, list[float]]] = {}
    solvable: dict[str, list[bool]] = {}
    for label, path in (("base", None), ("adapter", adapter)):
        chat.use_adapter(path, path.name if path else None)
        margins[label] = {name: [no_call_margin(chat, q) for q in questions] for name, questions in sets.items()}
        solvable[label] = [_solved_with_call_required(chat, q, a) for q, a in heldout]
    typer.echo("| model | bias | held-out solved | " + " | ".join(f"{name} refused" for name in sets) + " |")
    typer.echo("| --- | ---: | ---: | " + " | ".join("---:" for _ in sets) + " |")
    for label, by_set in margins.items():
        for bias in BIASES:
            solved = sum(m + bias <= 0 and ok for m, ok in zip(by_set["heldout"], solvable[label])) / len(heldout)
            shares = [refusal_share(values, bias) for values in by_set.values()]
            typer.echo(f"| {label} | {bias:+.1f} | {solved:.2f} | " + " | ".join(f"{s:.2f}" for s in shares) + " |")
    for label, by_set in margins.items():
        typer.echo(f"{label}: AUC irrelevance vs held-out {_auc(by_set['irrelevance'], by_set['heldout']):.3f}, "
                   f"abstention goals vs held-out {_auc(by_set['abstention goals'], by_set['heldout']):.3f}")
    if out is not None:
        out.write_text(json.dumps({"margins": margins, "solved_with_call_required": solvable}))


if __name__ == "__main__":
    typer.run(main)
