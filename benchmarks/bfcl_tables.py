"""Markdown tables for docs/bfcl.md from `selftune eval bfcl --out` runs.

    .venv/bin/python benchmarks/bfcl_tables.py docs/bfcl

Reads ``<model>-constrained.json`` and ``<model>-unconstrained.json`` per model. When the
unconstrained run sampled fewer questions, the constrained accuracy is also given on exactly
those questions (a smaller seeded sample is a subset of a larger one).
"""

from __future__ import annotations

import sys
from pathlib import Path

from selftune.bfcl import CATEGORIES
from selftune.bfcl.harness import BfclRun, CategoryResult


def _load(path: Path) -> dict[str, CategoryResult]:
    if not path.exists():
        return {}
    return {result.category: result for result in BfclRun.model_validate_json(path.read_text()).results}


def _accuracy_on(result: CategoryResult, ids: set[str]) -> float:
    records = [record for record in result.records if record.id in ids]
    return sum(record.valid for record in records) / len(records) if records else float("nan")


def table(folder: Path, model: str) -> str:
    constrained = _load(folder / f"{model}-constrained.json")
    free = _load(folder / f"{model}-unconstrained.json")
    lines = [
        "| category | n | accuracy | parse rate | mean s | mean tokens | unconstrained n | unconstrained accuracy | "
        "unconstrained parse rate | constrained accuracy on those |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {name: index for index, name in enumerate(CATEGORIES)}
    for category in sorted(dict.fromkeys([*constrained, *free]), key=lambda name: order.get(name, len(order))):
        c, u = constrained.get(category), free.get(category)
        left = (f"{c.n} | {c.accuracy:.2f} | {c.parse_rate:.2f} | {c.mean_latency_s:.2f} | {c.mean_output_tokens:.0f}"
                if c else "– | – | – | – | –")
        if u:
            same = f"{_accuracy_on(c, {r.id for r in u.records}):.2f}" if c else "–"
            right = f"{u.n} | {u.accuracy:.2f} | {u.parse_rate:.2f} | {same}"
        else:
            right = "– | – | – | –"
        lines.append(f"| {category} | {left} | {right} |")
    return "\n".join(lines)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bfcl")
    models = sorted({path.name.rsplit("-", 1)[0] for path in folder.glob("*-constrained.json")}
                    | {path.name.rsplit("-", 1)[0] for path in folder.glob("*-unconstrained.json")})
    for model in models:
        print(f"### {model}\n\n{table(folder, model)}\n")


if __name__ == "__main__":
    main()
