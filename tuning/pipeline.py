"""One self-tuning round: select -> build data -> train -> gate -> promote or reject -> report.

The candidate is trained from the base weights (or, with ``tuning.continue_from_active``, from
the active adapter's weights) on the selected episodes mixed with replayed earlier training
data and general/abstention conversations (tuning/replay.py). The active adapter and the
candidate then each run the held-out goals, score a fixed public-domain reference text
(cross-entropy: forgetting of general language) and answer the BFCL regression suites
(``tuning.regression_suites``: abstention, tool-call categories never trained on). The
candidate is promoted only when its held-out accuracy is at least the active one's plus
``promote_margin``, its reference cross-entropy is at most ``reference_tolerance_nats`` above the
base model's (measured from the base, so drift cannot add up over promotions) and no
regression suite lost more than its tolerance against the active adapter or the base model; a
rejected candidate is kept on disk but never becomes active. The candidate is registered only
after its evaluation, so a crash or interrupt anywhere before that leaves the registry unchanged.
With ``tuning.no_call_calibration`` the candidate is first given its no-call bias
(tuning/calibration.py): it must refuse at least as many calibration questions that want no call as
the active model and the base model do (less ``tuning.no_call_slack``), and it is evaluated with that bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from selftune.agent.goals import load_goals
from selftune.agent.local_chat import LocalChatModel
from selftune.bfcl import BfclQuestion, load_category
from selftune.hardware import current_hardware
from selftune.memory.records import utc_now
from selftune.runtime import Runtime
from selftune.settings import Settings
from selftune.tuning.adapters import AdapterVersion
from selftune.tuning.calibration import (
    calibrate_adapter, calibration_questions, calibration_target, no_call_margin, refusal_share,
)
from selftune.tuning.dataset import anchor_examples, build_examples, training_fingerprint
from selftune.tuning.evaluate import evaluate_goals, evaluate_regression_suites
from selftune.tuning.methods import get_method
from selftune.tuning.replay import earlier_training_data, load_replay_file, mix_replay
from selftune.tuning.report import SuiteResult, TuningReport, write_report
from selftune.tuning.selection import select_episodes
from selftune.tuning.trainer import train_adapter

__all__ = ["TuningOutcome", "gate", "regression_baseline", "run_tuning_round"]

Decision = Literal["promoted", "rejected", "skipped"]


class TuningOutcome(BaseModel):
    decision: Decision
    reason: str
    version: str | None = None
    report_dir: Path | None = None
    before: SuiteResult | None = None
    after: SuiteResult | None = None


def gate(before: SuiteResult, after: SuiteResult, margin: float, reference_before: float,
         reference_after: float, tolerance: float,
         regressions: Sequence[tuple[SuiteResult, SuiteResult, float]] = ()) -> tuple[Decision, str]:
    """Promote only if held-out accuracy gains ``margin``, reference cross-entropy rises at most
    ``tolerance`` nats and no regression suite ``(before, after, tolerance)`` loses more than
    its tolerance (absolute accuracy); the reason gives every figure, the failed check first."""
    accuracy = f"held-out accuracy {before.accuracy:.2f} -> {after.accuracy:.2f} (n={after.n}, margin {margin:+.2f})"
    rise = reference_after - reference_before
    reference = (f"reference cross-entropy {reference_before:.3f} -> {reference_after:.3f} "
                 f"({rise:+.3f} nats, tolerance {tolerance:.3f})")
    suites = [(f"{old.name} {old.accuracy:.2f} -> {new.accuracy:.2f} (n={new.n}, tolerance {allowed:.2f})",
               old.accuracy - new.accuracy > allowed + 1e-9) for old, new, allowed in regressions]
    figures = [accuracy, reference] + [text for text, _ in suites]
    if after.accuracy < before.accuracy + margin:
        return "rejected", "; ".join(figures)
    if rise > tolerance + 1e-9:
        return "rejected", "forgetting: " + "; ".join([reference, accuracy] + figures[2:])
    dropped = [text for text, failed in suites if failed]
    if dropped:
        return "rejected", "regression: " + "; ".join(dropped + [t for t in figures if t not in dropped])
    return "promoted", "; ".join(figures)


def regression_baseline(active: SuiteResult, base: SuiteResult) -> SuiteResult:
    """What a candidate is held to on a regression suite: the better of the active adapter's and the
    base model's result. A candidate may then lose at most the tolerance against either, so small
    losses cannot add up over promotions; the base's result is named ``<suite> (base)``."""
    if base.accuracy > active.accuracy:
        return base.model_copy(update={"name": f"{base.name} (base)"})
    return active


def run_tuning_round(runtime: Runtime, method: str | None = None, force: bool = False) -> TuningOutcome:
    """Run one round on ``runtime``'s data dir and model; always writes a report.

    A round whose examples, tuning settings and active adapter are those of a registered version
    is skipped (training is deterministic: it would rebuild that version), unless ``force``."""
    settings = runtime.settings
    tuning = settings.tuning
    method_name = get_method(method or tuning.method).name
    created = utc_now()
    report_dir = settings.reports_dir / created.strftime("%Y%m%dT%H%M%SZ")
    selection = select_episodes(runtime.store, tuning)
    previous = runtime.adapters.active_version()
    report = TuningReport(
        created_at=created, model_id=settings.model.name, method=method_name, decision="skipped", reason="",
        previous_version=previous, episodes_considered=selection.considered,
        episodes_selected=len(selection.selected), episodes_oversampled=len(selection.oversampled),
        scores=selection.scores,
        chosen=selection.chosen, skipped=selection.skipped, config=settings.model_dump(mode="json"),
        history=_history(runtime), hardware=current_hardware(),
    )

    def finish(decision: Decision, reason: str, **extra: object) -> TuningOutcome:
        final = report.model_copy(update={"decision": decision, "reason": reason, **extra})
        write_report(final, report_dir)
        return TuningOutcome(decision=decision, reason=reason, report_dir=report_dir,
                             version=final.candidate_version, before=final.eval_before.get("heldout"),
                             after=final.eval_after.get("heldout"))

    if not selection.selected:
        return finish("skipped", f"no episode scored at least {tuning.min_score} ({selection.considered} considered)")
    chat = runtime.model
    if not isinstance(chat, LocalChatModel):
        return finish("skipped", "tuning needs a local model; the configured one is served remotely")
    general = load_replay_file(tuning.replay_file) if tuning.replay_file else []
    earlier = earlier_training_data(runtime.adapters, runtime.store)
    episodes, replay = mix_replay(selection.training_episodes(), earlier, general,
                                  tuning.replay_ratio, tuning.replay_general_share, tuning.seed)
    report.replay = replay
    examples = build_examples(episodes, chat.tokenizer, tuning.max_seq_len)
    if not examples:
        return finish("skipped", f"every selected episode is longer than max_seq_len={tuning.max_seq_len}")
    examples += anchor_examples(tuning.anchor_file, chat.tokenizer, tuning.anchor_max_tokens)
    fingerprint = training_fingerprint(examples, method_name, settings.model.name, tuning.model_dump_json(),
                                       previous or "base")
    same = next((entry for entry in reversed(runtime.adapters.list()) if entry.fingerprint == fingerprint), None)
    if same and not force:
        return finish("skipped", f"nothing new to train on: {same.version} ({same.status}) was trained on the same "
                                 f"examples and settings from the same active adapter; waiting for new episodes")

    goals = load_goals(tuning.heldout_file)[: tuning.heldout_limit]
    reference_text = tuning.reference_file.read_text()
    before = evaluate_goals(runtime.agent(), goals)
    reference_before = chat.cross_entropy(reference_text)
    suites_before = evaluate_regression_suites(chat, tuning.regression_suites, tuning.seed)
    abstain, call = _calibration_set(settings)
    refused_before = refusal_share([no_call_margin(chat, q) for q in abstain], chat.no_call_bias)
    start_from = runtime.adapters.continuation_point(method_name) if tuning.continue_from_active else None
    version, out_dir = runtime.adapters.allocate()
    try:
        chat.use_adapter(None, None)  # the base weights; a new adapter, fresh or continuing the active one
        reference_base = chat.cross_entropy(reference_text)
        suites_base = (evaluate_regression_suites(chat, tuning.regression_suites, tuning.seed)
                       if previous else suites_before)
        refused_base = refusal_share([no_call_margin(chat, q) for q in abstain], 0.0)
        train = train_adapter(chat.model, chat.tokenizer, examples, tuning, out_dir, method_name, start_from)
        chat.use_adapter(out_dir, version)
        if abstain:
            report.calibration = calibrate_adapter(chat, out_dir, version, (abstain, call), calibration_target(
                refused_before, refused_base, slack=tuning.no_call_slack))
        after = evaluate_goals(runtime.agent(sync=False), goals)
        reference_after = chat.cross_entropy(reference_text)
        suites_after = evaluate_regression_suites(chat, tuning.regression_suites, tuning.seed)
    finally:
        runtime.sync_adapter()
    regressions = [(regression_baseline(suites_before[name], suites_base[name]), suites_after[name], suite.tolerance)
                   for suite in tuning.regression_suites if (name := f"bfcl:{suite.category}") in suites_before]
    decision, reason = gate(before, after, tuning.promote_margin, reference_base, reference_after,
                            tuning.reference_tolerance_nats, regressions)
    runtime.adapters.register(AdapterVersion(
        version=version, method=method_name, base_model=settings.model.name, path=out_dir,
        metrics={"heldout_before": before.accuracy, "heldout_after": after.accuracy,
                 "reference_ce_base": reference_base, "reference_ce_before": reference_before,
                 "reference_ce_after": reference_after,
                 "train_loss_last": train.losses[-1], "examples": train.examples,
                 "no_call_bias": report.calibration.bias if report.calibration else 0.0,
                 **{f"{name}_base": result.accuracy for name, result in suites_base.items()},
                 **{f"{name}_before": result.accuracy for name, result in suites_before.items()},
                 **{f"{name}_after": result.accuracy for name, result in suites_after.items()}},
        trained_on=list(dict.fromkeys(episode.id for episode in episodes if episode.origin != "replay")),
        fingerprint=fingerprint,
    ))
    if decision == "promoted":
        runtime.adapters.promote(version, reason)
    else:
        runtime.adapters.reject(version, reason)
    runtime.sync_adapter()
    return finish(decision, reason, candidate_version=version, train=train,
                  eval_before={"heldout": before, **suites_before}, eval_after={"heldout": after, **suites_after},
                  reference_ce_base=reference_base, reference_ce_before=reference_before,
                  reference_ce_after=reference_after,
                  history=_history(runtime))


def _calibration_set(settings: Settings) -> tuple[list[BfclQuestion], list[BfclQuestion]]:
    """The no-call calibration's questions (``tuning.no_call_calibration`` of them; none when 0), outside
    the samples of the regression suites the gate runs."""
    tuning = settings.tuning
    if not tuning.no_call_calibration:
        return [], []
    gated = {question.id for suite in tuning.regression_suites
             for question, _ in load_category(suite.category, limit=suite.limit, seed=tuning.seed)}
    return calibration_questions(tuning.no_call_calibration, gated)


def _history(runtime: Runtime) -> list[tuple[str, float]]:
    """(version, held-out accuracy after training) of every evaluated version, oldest first."""
    return [
        (entry.version, float(entry.metrics["heldout_after"]))
        for entry in runtime.adapters.list() if "heldout_after" in entry.metrics
    ]

