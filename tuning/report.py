"""The record of one tuning run: ``report.json``, ``report.md`` and a self-contained ``report.html``.

Plots (training loss, reward histogram, held-out accuracy before/after) are
drawn with matplotlib's Agg canvas, saved as PNGs beside ``report.md`` and
embedded as base64 in the HTML. Templates live in ``tuning/templates/``.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict, Field

from selftune.hardware import Hardware
from selftune.memory.records import utc_now
from selftune.tuning.calibration import NoCallCalibration
from selftune.tuning.replay import ReplayMix
from selftune.tuning.trainer import TrainResult

__all__ = [
    "REPORT_SECTIONS", "SuiteResult", "TuningReport", "ReportPaths",
    "package_versions", "write_report", "latest_report",
]

# Section headings of report.md and report.html, in order.
REPORT_SECTIONS = ("Decision", "Data", "Training", "Evaluation", "Version history", "Configuration", "Environment")
_PACKAGES = ("torch", "transformers", "peft")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class SuiteResult(BaseModel):
    """Accuracy of one evaluation suite run."""

    name: str
    accuracy: float
    n: int
    passed: int = 0
    episode_ids: list[str] = Field(default_factory=list)
    seconds: float = 0.0


class TuningReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    created_at: datetime = Field(default_factory=utc_now)
    model_id: str
    method: str
    decision: Literal["promoted", "rejected", "skipped"]
    reason: str
    candidate_version: str | None = None
    previous_version: str | None = None  # active before this run; None = base model
    episodes_considered: int = 0
    episodes_selected: int = 0
    episodes_oversampled: int = 0  # extra copies of no-call episodes (tuning.min_abstention_share)
    replay: ReplayMix | None = None  # earlier and general examples mixed in
    scores: list[float] = Field(default_factory=list)  # scores of the episodes considered
    chosen: dict[str, str] = Field(default_factory=dict)  # episode id -> why it was selected
    skipped: dict[str, str] = Field(default_factory=dict)  # episode id -> why it was not selected
    train: TrainResult | None = None
    eval_before: dict[str, SuiteResult] = Field(default_factory=dict)
    eval_after: dict[str, SuiteResult] = Field(default_factory=dict)
    reference_ce_base: float | None = None  # of the base weights: what the gate bounds the candidate's rise against
    reference_ce_before: float | None = None  # mean cross-entropy (nats/token) on the reference text
    reference_ce_after: float | None = None
    calibration: NoCallCalibration | None = None  # the candidate's no-call bias (tuning.no_call_calibration)
    config: dict[str, Any] = Field(default_factory=dict)
    packages: dict[str, str] = Field(default_factory=package_versions)
    hardware: Hardware | None = None  # the machine it ran on; None in reports written before it was kept
    history: list[tuple[str, float]] = Field(default_factory=list)  # (version, held-out accuracy), oldest first


class ReportPaths(BaseModel):
    json_path: Path
    markdown: Path
    html: Path
    plots: dict[str, Path]


def _figure() -> tuple[Figure, Any]:
    figure = Figure(figsize=(6, 3.2), dpi=100, layout="tight")
    return figure, figure.add_subplot()


def _no_data(axes: Any, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="gray")
    axes.set_xticks([])
    axes.set_yticks([])


def _loss_plot(report: TuningReport) -> Figure:
    figure, axes = _figure()
    if report.train and report.train.losses:
        steps = range(1, len(report.train.losses) + 1)
        axes.plot(steps, report.train.losses, marker="o", markersize=3)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("loss")
    else:
        _no_data(axes, "no training")
    axes.set_title("Training loss")
    return figure


def _reward_plot(report: TuningReport) -> Figure:
    figure, axes = _figure()
    if report.scores:
        axes.hist(report.scores, bins=10, range=(0.0, 1.0), edgecolor="white")
        axes.set_xlabel("episode score")
        axes.set_ylabel("episodes")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _no_data(axes, "no scored episodes")
    axes.set_title("Reward distribution")
    return figure


def _eval_plot(report: TuningReport) -> Figure:
    figure, axes = _figure()
    suites = sorted(set(report.eval_before) | set(report.eval_after))
    if suites:
        positions = range(len(suites))
        for offset, label, results in ((-0.2, "before", report.eval_before), (0.2, "after", report.eval_after)):
            values = [results[s].accuracy if s in results else 0.0 for s in suites]
            axes.bar([p + offset for p in positions], values, width=0.4, label=label)
        axes.set_xticks(list(positions), suites)
        axes.set_xlim(-0.8, len(suites) - 0.2)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.legend()
    else:
        _no_data(axes, "no evaluation")
    axes.set_title("Evaluation before / after")
    return figure


def _history_plot(report: TuningReport) -> Figure:
    figure, axes = _figure()
    if report.history:
        versions = [version for version, _ in report.history]
        axes.plot(range(len(versions)), [accuracy for _, accuracy in report.history], marker="o")
        axes.set_xticks(range(len(versions)), versions)
        axes.set_ylim(0, 1)
        axes.set_ylabel("held-out accuracy")
    else:
        _no_data(axes, "no versions yet")
    axes.set_title("History across versions")
    return figure


_PLOTS = {"loss": _loss_plot, "rewards": _reward_plot, "eval": _eval_plot, "history": _history_plot}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _eval_rows(report: TuningReport) -> list[dict[str, Any]]:
    rows = []
    for suite in sorted(set(report.eval_before) | set(report.eval_after)):
        before, after = report.eval_before.get(suite), report.eval_after.get(suite)
        delta = after.accuracy - before.accuracy if before and after else None
        rows.append({"suite": suite, "before": before, "after": after, "delta": delta})
    return rows


_templates = Environment(
    loader=PackageLoader("selftune.tuning", "templates"),
    undefined=StrictUndefined,
    autoescape=select_autoescape(enabled_extensions=("html.j2",)),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def write_report(report: TuningReport, out_dir: Path) -> ReportPaths:
    """Write the report's JSON, Markdown, HTML and plot PNGs into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {name: _png(plot(report)) for name, plot in _PLOTS.items()}
    plots = {name: out_dir / f"{name}.png" for name in pngs}
    for name, data in pngs.items():
        plots[name].write_bytes(data)
    context = {
        "r": report,
        "eval_rows": _eval_rows(report),
        "config_text": json.dumps(report.model_dump(mode="json")["config"], indent=2),
    }
    paths = ReportPaths(
        json_path=out_dir / "report.json", markdown=out_dir / "report.md", html=out_dir / "report.html", plots=plots
    )
    paths.json_path.write_text(report.model_dump_json(indent=2))
    markdown = _templates.get_template("report.md.j2").render(**context, images={n: p.name for n, p in plots.items()})
    paths.markdown.write_text(markdown)
    images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in pngs.items()}
    html = _templates.get_template("report.html.j2").render(**context, images=images)
    paths.html.write_text(html)
    return paths


def latest_report(reports_dir: Path) -> Path | None:
    """Directory of the newest report (by ``created_at``) under ``reports_dir``, or None."""
    newest: tuple[datetime, Path] | None = None
    for path in Path(reports_dir).glob("*/report.json"):
        created = TuningReport.model_validate_json(path.read_bytes()).created_at
        if newest is None or created > newest[0]:
            newest = (created, path.parent)
    return newest[1] if newest else None
