"""How well held-back live_irrelevance questions stand in for BFCL's irrelevance suite.

    .venv/bin/python benchmarks/calibration_transfer.py --adapter W/adapters/v0001 [--adapter ...] [--out F.json]

For the base weights and each adapter, prints the share refused at bias 0 (margin > 0, see
:func:`selftune.tuning.calibration.no_call_margin`) of the last 100 live_irrelevance questions
(file order) outside the seeded 240-question sample (so outside every evaluated sample up to
``--eval-limit 240``) and of all 240 irrelevance questions. If the two shares move together, a
no-call bias set on the first leaves the second where the base model has it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from selftune.bench.self_improvement import _local_chat
from selftune.bfcl import load_category
from selftune.settings import load_settings
from selftune.tuning.calibration import no_call_margin, refusal_share


def main(
    adapter: Annotated[list[Path], typer.Option(help="Adapter directory to compare (repeatable).")],
    model: Annotated[str, typer.Option(help="Model name.")] = "smollm2-135m-instruct",
    out: Annotated[Optional[Path], typer.Option(help="Write every margin as JSON.")] = None,
) -> None:
    settings = load_settings(model={"name": model})
    chat = _local_chat(settings)
    seed = settings.tuning.seed
    evaluated = {q.id for q, _ in load_category("live_irrelevance", limit=240, seed=seed)}
    sets = {"lirr_heldback": [q for q, _ in load_category("live_irrelevance") if q.id not in evaluated][-100:],
            "irrelevance_240": [q for q, _ in load_category("irrelevance")]}
    margins: dict[str, dict[str, list[float]]] = {}
    typer.echo("| model | held-back live_irrelevance refused | irrelevance (240) refused |\n| --- | ---: | ---: |")
    for path in (None, *adapter):
        label = str(path) if path else "base"
        chat.use_adapter(path, path.name if path else None)
        margins[label] = {name: [no_call_margin(chat, q) for q in questions] for name, questions in sets.items()}
        typer.echo(f"| {label} | " + " | ".join(f"{refusal_share(m, 0.0):.2f}" for m in margins[label].values()) + " |")
    if out is not None:
        out.write_text(json.dumps(margins))


if __name__ == "__main__":
    typer.run(main)
