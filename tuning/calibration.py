"""The no-call bias: an adapter's threshold between calling a tool and answering that none fits.

Tuning on the model's own verified calls teaches it to call more readily, and that
readiness carries over to questions no offered tool fits: abstention suites drop although the
candidate separates the two kinds of question better than the base model does (measured in
``docs/self_improvement.md``). So the threshold is set apart from the weights. While the greedy
reply chooses its tool (``{"tool": "`` and the name's first token, in the decoder's own tokens)
the *margin* is the largest gap between the best token that chooses ``none`` and the best other
admissible token; greedy decoding answers "no tool" exactly when margin + bias > 0
(``ToolCallLogitsProcessor``'s ``no_call_bias`` and ``no_call_margins``).

:func:`calibrate` picks the smallest bias on :data:`BIAS_GRID` at which the candidate refuses
at least ``target`` of a set of abstention questions it was never trained or gated on (the
share the model it would replace refuses), and reports what share of call questions it still
calls on. The abstention questions are BFCL live_irrelevance questions outside every evaluated
sample (:func:`calibration_questions`): pairs of train-category questions with each other's
functions did not transfer (a candidate trained without refusals matched the base on them at
+3.0 and still lost 10 points of irrelevance; candidates trained on such pairs refuse them more
readily than the base while irrelevance drops), whereas held-back live_irrelevance questions
were refused within 3 points as often as all 240 irrelevance questions by the base model and four
of five candidates (``docs/self_improvement.md``, which also records a candidate where the two
parted). The bias is saved beside the adapter's weights
(:data:`DECODING_FILE`), so it is applied wherever the adapter is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel

from selftune.agent.local_chat import DECODING_FILE, AdapterDecoding, LocalChatModel
from selftune.bfcl import BfclQuestion, load_category
from selftune.bfcl.harness import build_messages
from selftune.tuning.adapters import write_atomic

__all__ = [
    "ABSTAIN_CATEGORY", "BIAS_GRID", "CALL_CATEGORIES", "NoCallCalibration", "calibrate", "calibrate_adapter",
    "calibration_questions", "calibration_target", "no_call_margin", "refusal_share", "save_decoding",
]

# 0 to +4 nats in quarters. Never below 0: the bias undoes tuning's drift towards calling, and a
# candidate trained on abstention goals refuses pairs like them more readily than the base model
# while BFCL irrelevance still drops (measured), so a negative bias would make it worse there.
BIAS_GRID = tuple(step / 4 for step in range(0, 17))
ABSTAIN_CATEGORY = "live_irrelevance"  # BFCL questions that no offered function fits
CALL_CATEGORIES = ("simple_python", "multiple")  # BFCL questions that want one call of an offered function


class NoCallCalibration(BaseModel):
    bias: float
    target: float  # share of the abstention questions to refuse at least
    refused: float  # share refused at ``bias``
    called: float | None  # share of the call questions still answered with a call at ``bias``
    abstain_questions: int
    call_questions: int


def no_call_margin(chat: LocalChatModel, question: BfclQuestion) -> float:
    """The margin of ``question``'s greedy reply with the active adapter (see the module docstring)."""
    return chat.no_call_margin(build_messages(question), question.tools())


def calibration_questions(count: int, exclude: set[str] = frozenset()) -> tuple[list[BfclQuestion], list[BfclQuestion]]:
    """``(abstain, call)``: ``count`` :data:`ABSTAIN_CATEGORY` questions and ``count`` questions of
    :data:`CALL_CATEGORIES`, spread over each pool, none with an id in ``exclude`` (the evaluated
    and trained ones)."""

    def held_back(categories: Sequence[str]) -> list[BfclQuestion]:
        pool = [question for category in categories for question, _ in load_category(category)
                if question.id not in exclude]
        if len(pool) < count:
            raise ValueError(f"the no-call calibration wants {count} questions of {', '.join(categories)} "
                             f"outside the evaluated and trained ones; {len(pool)} are left")
        return pool[::len(pool) // count][:count]

    return held_back([ABSTAIN_CATEGORY]), held_back(CALL_CATEGORIES)


def refusal_share(margins: Sequence[float], bias: float) -> float:
    """Share of ``margins`` that answer "no tool" with ``bias`` added."""
    return sum(margin + bias > 0 for margin in margins) / len(margins) if margins else 0.0


def calibrate(abstain_margins: Sequence[float], call_margins: Sequence[float], target: float,
              grid: Sequence[float] = BIAS_GRID) -> NoCallCalibration:
    """The smallest bias on ``grid`` that refuses at least ``target`` of ``abstain_margins``
    (the largest when none does)."""
    if not abstain_margins:
        raise ValueError("calibration needs at least one abstention question")
    ordered = sorted(grid)
    bias = next((b for b in ordered if refusal_share(abstain_margins, b) >= target - 1e-9), ordered[-1])
    return NoCallCalibration(
        bias=bias, target=target, refused=refusal_share(abstain_margins, bias),
        called=1.0 - refusal_share(call_margins, bias) if call_margins else None,
        abstain_questions=len(abstain_margins), call_questions=len(call_margins))


def calibration_target(*refused: float, slack: float) -> float:
    """The share to refuse: the most that any model the candidate is held to refuses, less ``slack``."""
    return max(0.0, max(refused) - slack)


def calibrate_adapter(chat: LocalChatModel, adapter_dir: Path, version: str,
                      questions: tuple[Sequence[BfclQuestion], Sequence[BfclQuestion]],
                      target: float) -> NoCallCalibration:
    """Calibrate the loaded adapter at ``adapter_dir`` on ``questions`` (abstain, call), save its bias
    beside its weights and load it again with that bias."""
    abstain, call = ([no_call_margin(chat, question) for question in group] for group in questions)
    calibration = calibrate(abstain, call, target)
    save_decoding(adapter_dir, AdapterDecoding(no_call_bias=calibration.bias))
    chat.use_adapter(adapter_dir, version)
    return calibration


def save_decoding(adapter_dir: Path, decoding: AdapterDecoding) -> None:
    """Write ``decoding`` beside the adapter's weights (:data:`DECODING_FILE`), atomically."""
    write_atomic(Path(adapter_dir) / DECODING_FILE, decoding.model_dump_json(indent=2).encode())
