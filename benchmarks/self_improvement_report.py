"""Tables, plots and the combined JSON for docs/self_improvement.md from benchmark runs.

    .venv/bin/python benchmarks/self_improvement_report.py docs/self_improvement

Reads every ``selftune bench self-improvement --out`` file in the folder, writes one plot per run
(``<run>.png``: accuracy of each round's model per suite; hollow markers: rejected candidates) and
``docs/self_improvement.json`` (all runs), and prints a Markdown table per run.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from selftune.bench.self_improvement import HELDOUT, UNTRAINED_SUITES, BenchRound, SelfImprovementRun

SUITES = (HELDOUT, f"{HELDOUT}:simple_python", f"{HELDOUT}:multiple", *UNTRAINED_SUITES)


def plot(run: SelfImprovementRun) -> Figure:
    """Accuracy of each round's model per suite; rejected candidates hollow, skipped rounds left out."""
    figure = Figure(figsize=(7, 3.6), dpi=100, layout="tight")
    axes = figure.add_subplot()
    measured = [r for r in run.rounds if r.candidate]  # a skipped round evaluated nothing
    rounds = [r.round for r in measured]
    for suite in SUITES:
        values = [r.candidate.get(suite) for r in measured]
        if all(v is not None for v in values):
            line, = axes.plot(rounds, values, marker="o", label=suite)
            rejected = [(r.round, r.candidate[suite]) for r in measured if r.decision == "rejected"]
            if rejected:  # hollow markers
                axes.scatter(*zip(*rejected), s=80, facecolors="white", edgecolors=line.get_color(), zorder=3)
    axes.set_xticks([r.round for r in run.rounds])
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy (round's candidate)")
    axes.set_ylim(0, 1)
    axes.legend(fontsize=7, ncol=2)
    options = [
        f"{run.train_questions} train questions" if run.train_questions != 80 else "",
        f"{run.abstain_goals} abstention goals" if run.abstain_goals else "",
        f"{run.near_miss_goals} near-miss" if run.near_miss_goals else "",
        f"KL {run.kl_weight:g}" if run.kl_weight else "",
        f"anchor {run.anchor_file} x{run.anchor_weight:g}" if run.anchor_file else "",
        f"no-call share <= {run.max_abstention_share:g}" if run.max_abstention_share < 1 else "",
        f"no-call share >= {run.min_abstention_share:g}" if run.min_abstention_share else "",
        "continued" if run.continue_from_active else "",
        f"{run.call_required_attempts} call-required attempt(s)" if run.call_required_attempts else "",
        f"no-call bias from {run.calibration_goals} questions" if run.calibration_goals else "",
        f"no-call slack {run.no_call_slack:g}" if run.no_call_slack else "",
        f"update x{run.lora_scale:g}" if run.lora_scale != 1 else "",
        run.dtype if run.dtype != "bfloat16" else "",
    ]
    baseline = any(r.decision == "baseline" for r in run.rounds)  # no tuning: replay and gate do not apply
    extra = "".join(f", {option}" for option in options if option) + (
        "" if run.replay and run.gate or baseline else " (ablation)")
    title = textwrap.wrap(f"{run.model}, {run.method}{extra}", 90, break_on_hyphens=False)
    axes.set_title("\n".join(title), fontsize=9)
    return figure


def table(run: SelfImprovementRun) -> str:
    head = ["round", "decision", *SUITES, "ref CE", "collect s", "train s", "eval s", "solved/attempts",
            "selected (no-call + copies)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    first = next((r for r in run.rounds if r.attempts), None)
    for r in run.rounds:
        notes = [f"bias {r.calibration.bias:+.2f}" if r.calibration else "", _step(r, first)]
        noted = "; ".join(note for note in notes if note)
        cells = [str(r.round), r.decision + (f" ({noted})" if noted else "")]
        cells += [f"{r.candidate[s]:.2f}" if s in r.candidate else "–" for s in SUITES]
        cells += [f"{r.reference_ce:.3f}" if r.reference_ce is not None else "–",
                  f"{r.seconds.collect:.0f}", f"{r.seconds.train:.0f}", f"{r.seconds.evaluate:.0f}",
                  _solved(r), _selected(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step(r: BenchRound, first: BenchRound | None) -> str:
    """A round's steps and learning rate where they differ from the run's first trained round (``--resume``)."""
    if r.max_steps is None or first is None or (r.max_steps, r.learning_rate) == (first.max_steps, first.learning_rate):
        return ""
    return f"{r.max_steps} steps at {r.learning_rate:.0e}".replace("e-0", "e-")


def _solved(r: BenchRound) -> str:
    if not r.attempts:
        return "–"
    required = f" ({r.call_required_solved} call required)" if r.call_required_solved else ""
    return f"{r.solved_attempts}/{r.attempts}{required}"


def _selected(r: BenchRound) -> str:
    if not r.attempts:
        return "–"
    if r.abstentions is None:
        return str(r.selected)
    return f"{r.selected} ({r.abstentions} + {r.oversampled})"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/self_improvement")
    runs = {path.stem: SelfImprovementRun.model_validate_json(path.read_text()) for path in sorted(folder.glob("*.json"))}
    for name, run in runs.items():
        plot(run).savefig(folder / f"{name}.png")
        print(f"### {name}\n\n{table(run)}\n\n![{name}](self_improvement/{name}.png)\n")
    combined = {name: run.model_dump(mode="json") for name, run in runs.items()}
    (folder.parent / "self_improvement.json").write_text(json.dumps(combined, indent=1) + "\n")


if __name__ == "__main__":
    main()
