"""Self-improvement benchmark: does tuning on its own verified episodes make the model better,
without forgetting?

BFCL questions are the goals and BFCL's checker is the verifier reward. A committed split
(``configs/self_improvement_split.json``, :func:`make_split`) fixes which simple_python and
multiple questions are trained on and which are held out. Round 0 evaluates the base model;
each later round then

1. **collects**: every train goal, and ``abstain_goals`` + ``near_miss_goals`` abstention goals
   made from train questions (:func:`abstention_goals`), is attempted ``attempts`` times with the active
   adapter through the constrained tool-call path (the first attempt greedy, the others
   sampled) and stored as an episode (prompt, call) with a verifier reward of 1 or 0; with
   ``call_required_attempts`` each train goal also gets that many attempts with the no-call answer
   withheld (a hint, as STaR's rationalisation: the model's own call on a question it would
   refuse), stored with the same prompt and kept only when verified;
2. **tunes**: the production pieces, as ``selftune tune`` runs them: episode selection, replay
   mixing (earlier promoted episodes and ``configs/replay.jsonl``), training from the base
   weights (or the active adapter's, ``tuning.continue_from_active``), with ``tuning.kl_weight``'s
   pull towards the base model on replayed conversations;
3. **evaluates** the candidate on every suite: held-out simple_python and multiple, and
   live_simple, live_multiple, irrelevance, live_irrelevance (never trained on; seeded
   samples), plus reference-text cross-entropy;
4. **gates** it against the active adapter's results with :func:`selftune.tuning.pipeline.gate`
   (held-out = both held-out suites together; regression suites: the four never-trained ones, each
   held to the better of the active adapter's and the base model's result).

``replay=False`` and ``gate=False`` give the ablation (nothing replayed; every candidate
promoted). :func:`run_fewshot_baseline` is the cheap baseline every adapter must beat: no weight
change, one collection round, then the best matching solved episodes (by embedding similarity of
the request and the offered functions' names, from a Chroma memory) as few-shot turns in the
prompt, each showing the functions it was offered. Each phase is
timed.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from selftune.agent.generation import generate
from selftune.agent.models import load_causal_lm, resolve_dtype
from selftune.agent.local_chat import LocalChatModel
from selftune.agent.tool_calls import ToolCallError, parse_tool_calls
from selftune.bfcl import BfclAnswer, BfclQuestion, load_category
from selftune.bfcl.harness import build_messages, score_reply
from selftune.bfcl.mismatch import mismatched
from selftune.memory.embeddings import DEFAULT_EMBEDDING_MODEL
from selftune.memory.episodes import EpisodeStore
from selftune.memory.records import ChatMessage, Episode, Reward, Step, new_id
from selftune.memory.vector import VectorMemory
from selftune.settings import PROJECT_ROOT, Settings
from selftune.tuning.adapters import AdapterRegistry, AdapterVersion
from selftune.tuning.calibration import (
    NoCallCalibration,
    calibrate_adapter,
    calibration_questions,
    calibration_target,
    no_call_margin,
    refusal_share,
)
from selftune.tuning.dataset import anchor_examples, build_examples
from selftune.tuning.evaluate import bfcl_suite
from selftune.tuning.pipeline import gate, regression_baseline
from selftune.tuning.replay import earlier_training_data, load_replay_file, mix_replay
from selftune.tuning.report import SuiteResult
from selftune.tuning.selection import select_episodes
from selftune.tuning.trainer import train_adapter

__all__ = [
    "SPLIT_FILE", "BenchRound", "SelfImprovementRun", "Split", "abstention_goals", "calibration_goals", "make_split",
    "run_fewshot_baseline", "run_self_improvement", "train_questions", "widen_train",
]

SPLIT_FILE = PROJECT_ROOT / "configs" / "self_improvement_split.json"
TRAIN_CATEGORIES = ("simple_python", "multiple")
UNTRAINED_SUITES = ("live_simple", "live_multiple", "irrelevance", "live_irrelevance")
HELDOUT = "heldout"


class Split(BaseModel):
    """Train and held-out question ids per category (disjoint)."""

    seed: int
    train: dict[str, list[str]]
    heldout: dict[str, list[str]]


def make_split(seed: int = 0, train_per_category: int = 40, heldout_per_category: int = 30) -> Split:
    """A seeded split of :data:`TRAIN_CATEGORIES` into train and held-out ids."""
    rng = random.Random(seed)
    train, heldout = {}, {}
    for category in TRAIN_CATEGORIES:
        ids = sorted(question.id for question, _ in load_category(category))
        rng.shuffle(ids)
        if len(ids) < train_per_category + heldout_per_category:
            raise ValueError(f"{category} has only {len(ids)} questions")
        train[category] = sorted(ids[:train_per_category])
        heldout[category] = sorted(ids[train_per_category:train_per_category + heldout_per_category])
    return Split(seed=seed, train=train, heldout=heldout)


def widen_train(split: Split, per_category: int) -> Split:
    """``split`` with train grown to ``per_category`` questions per category, drawn (seeded by the
    split's seed) from the questions neither side uses; held-out stays exactly as it is."""
    rng = random.Random(split.seed)
    train = {}
    for category, ids in split.train.items():
        if per_category < len(ids):
            raise ValueError(f"train has {len(ids)} {category} questions already; cannot shrink to {per_category}")
        used = set(ids) | set(split.heldout.get(category, []))
        unused = sorted(question.id for question, _ in load_category(category) if question.id not in used)
        rng.shuffle(unused)
        if len(unused) < per_category - len(ids):
            raise ValueError(f"{category} has only {len(unused)} questions outside the split; "
                             f"cannot grow train to {per_category}")
        train[category] = sorted(ids + unused[:per_category - len(ids)])
    return split.model_copy(update={"train": train})


class PhaseSeconds(BaseModel):
    collect: float = 0.0
    train: float = 0.0
    evaluate: float = 0.0


class BenchRound(BaseModel):
    round: int
    decision: str  # "base" for round 0, else promoted / rejected / skipped
    reason: str = ""
    candidate: dict[str, float] = Field(default_factory=dict, description="Suite accuracies of this round's model.")
    active: dict[str, float] = Field(default_factory=dict, description="Suite accuracies of the model active after it.")
    reference_ce: float | None = None
    attempts: int = 0
    solved_attempts: int = 0
    selected: int = 0
    abstentions: int | None = None  # of the selected, no-call answers (None: not recorded)
    oversampled: int = 0  # extra copies of no-call answers (tuning.min_abstention_share)
    call_required_solved: int = 0  # of solved_attempts, those made with the no-call answer withheld
    replayed: int = 0
    learning_rate: float | None = None  # the step this round trained with (None: base round, or not recorded)
    max_steps: int | None = None
    calibration: NoCallCalibration | None = None  # the candidate's no-call bias (--calibration-goals)
    seconds: PhaseSeconds = Field(default_factory=PhaseSeconds)


class SelfImprovementRun(BaseModel):
    model: str
    method: str
    replay: bool
    gate: bool
    attempts: int
    eval_limit: int
    train_questions: int = 80
    abstain_goals: int = 0
    near_miss_goals: int = 0
    call_required_attempts: int = 0
    calibration_goals: int = 0
    base_refused: float | None = None  # share of the calibration abstention goals the base model refuses
    kl_weight: float = 0.0
    anchor_file: str | None = None  # tuning.anchor_file's name: prose held to the base model in every step
    anchor_weight: float = 0.0  # its KL weight (0: no anchor)
    continue_from_active: bool = False
    max_abstention_share: float = 1.0
    min_abstention_share: float = 0.0
    lora_scale: float = 1.0
    no_call_slack: float = 0.0
    dtype: str = "bfloat16"  # the runs recorded before `model.dtype: auto` were all bf16
    rounds: list[BenchRound] = Field(default_factory=list)


CALL_REQUIRED_ORIGIN = "bfcl-train-call-required"


def record_attempt(store: EpisodeStore, chat: LocalChatModel, question: Any, answer: Any, temperature: float,
                   allow_no_call: bool = True) -> bool:
    """Answer ``question`` once and store it as an episode with the checker's verdict as its reward;
    whether the reply was right."""
    messages = build_messages(question)
    reply = generate(chat, messages, max_tokens=256, temperature=temperature, tools=question.tools(),
                     allow_no_call=allow_no_call)
    text = str(reply.content)
    _, _, result = score_reply(question, answer, text)
    try:
        calls = parse_tool_calls(text)
    except ToolCallError:
        calls = []
    episode_id = new_id()
    steps = [
        Step(index=0, kind="system", message=ChatMessage(role="system", content=messages[0].content)),
        Step(index=1, kind="goal", message=ChatMessage(role="user", content=messages[-1].content)),
        Step(index=2, kind="action", message=ChatMessage(role="assistant", content=text, tool_calls=calls),
             model_id=chat.model_id, adapter_version=chat.adapter_version, trainable=bool(calls)),
    ]
    store.create_episode(Episode(
        id=episode_id, goal=f"{question.id}: {messages[-1].content}", status="done",
        origin="bfcl-train" if allow_no_call else CALL_REQUIRED_ORIGIN,
        model_id=chat.model_id, adapter_version=chat.adapter_version, steps=steps,
        rewards=[Reward(episode_id=episode_id, source="verifier", value=float(result.valid), note=result.error)]))
    return result.valid


def _count(ids: dict[str, list[str]]) -> int:
    return sum(len(category_ids) for category_ids in ids.values())


def train_questions(split: Split) -> list[tuple[BfclQuestion, BfclAnswer | None]]:
    questions = []
    for category, ids in split.train.items():
        wanted = set(ids)
        questions += [(question, answer) for question, answer in load_category(category) if question.id in wanted]
    return questions


def abstention_goals(split: Split, count: int, near_miss: int = 0,
                     embedding_model: str = DEFAULT_EMBEDDING_MODEL) -> list[tuple[BfclQuestion, None]]:
    """Train questions offered functions that do not fit them: the right reply is the no-call answer.

    ``count`` questions (``~none``) get the functions of a train question from the other half of
    the list (so the other category); ``near_miss`` further questions (``~near``, from those not
    used yet) get the closest-reading other functions that still do not fit
    (:func:`selftune.bfcl.mismatch.near_miss_partners`): a plausible but wrong tool, as in BFCL's irrelevance category.
    Abstention is learned from the model's own verified refusals, never from BFCL's irrelevance data."""
    return mismatched([question for question, _ in train_questions(split)], count, near_miss, embedding_model)


def calibration_goals(split: Split, count: int, eval_limit: int,
                      seed: int) -> tuple[list[BfclQuestion], list[BfclQuestion]]:
    """The no-call calibration's questions (:func:`selftune.tuning.calibration.calibration_questions`),
    outside the split and the evaluated samples of the never-trained suites."""
    used = {question_id for ids in (*split.train.values(), *split.heldout.values()) for question_id in ids}
    used |= {question.id for category in UNTRAINED_SUITES
             for question, _ in load_category(category, limit=eval_limit, seed=seed)}
    return calibration_questions(count, used)


def _collect(store: EpisodeStore, chat: LocalChatModel, split: Split, attempts: int, temperature: float,
             abstain: list[tuple[BfclQuestion, None]], call_required_attempts: int = 0) -> tuple[int, int, int]:
    """Attempt every train and abstention goal; (attempts, solved, solved with the call required)."""
    train = train_questions(split)
    planned = [(question, answer, attempt, True) for question, answer in train + abstain for attempt in range(attempts)]
    planned += [(question, answer, attempt, False) for question, answer in train
                for attempt in range(call_required_attempts)]
    solved = required_solved = 0
    for question, answer, attempt, allow_no_call in tqdm(planned, desc="collecting", unit="attempt", leave=False):
        valid = record_attempt(store, chat, question, answer, 0.0 if attempt == 0 else temperature, allow_no_call)
        solved += valid
        required_solved += valid and not allow_no_call
    return len(planned), solved, required_solved


def _evaluate(chat: LocalChatModel, split: Split, eval_limit: int, seed: int,
              exemplars: Any = None) -> dict[str, SuiteResult]:
    suites = {f"{HELDOUT}:{category}": bfcl_suite(chat, f"{HELDOUT}:{category}", category, ids=ids,
                                                  exemplars=exemplars)
              for category, ids in split.heldout.items()}
    for category in UNTRAINED_SUITES:
        suites[category] = bfcl_suite(chat, category, category, limit=eval_limit, seed=seed, exemplars=exemplars)
    passed = sum(suites[f"{HELDOUT}:{c}"].passed for c in split.heldout)
    n = sum(suites[f"{HELDOUT}:{c}"].n for c in split.heldout)
    suites[HELDOUT] = SuiteResult(name=HELDOUT, accuracy=passed / n if n else 0.0, n=n, passed=passed)
    return suites


def _local_chat(settings: Settings) -> LocalChatModel:
    model, tokenizer = load_causal_lm(settings.model.name, settings.model_cache, settings.model.dtype)
    if settings.model.threads:
        torch.set_num_threads(settings.model.threads)
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=settings.model.name)


@contextlib.contextmanager
def _work_dir(work_dir: Path | None) -> Iterator[Path]:
    if work_dir is not None:
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="selftune-self-improvement-") as scratch:
        yield Path(scratch)


def run_self_improvement(
    settings: Settings,
    rounds: int = 3,
    attempts: int = 4,
    temperature: float = 0.7,
    eval_limit: int = 50,
    replay: bool = True,
    use_gate: bool = True,
    regression_tolerance: float = 0.02,
    abstain_goals: int = 20,
    near_miss_goals: int = 0,
    call_required_attempts: int = 0,
    calibration_count: int = 0,
    split: Split | None = None,
    work_dir: Path | None = None,
    resume: SelfImprovementRun | None = None,
    on_round: Any = None,
) -> SelfImprovementRun:
    """Run the benchmark on ``settings.model`` with ``settings.tuning`` (method, LoRA/prompt options).

    ``resume``: a run recorded with the same options whose episodes and adapters are in ``work_dir``;
    its rounds are kept and the run goes on to round ``rounds``. The learning rate and step count may
    differ from the recorded rounds' (each round records its own). A round that was cut short is run
    again; the attempts it had stored stay in the episode store."""
    split = split or Split.model_validate_json(SPLIT_FILE.read_text())
    tuning = settings.tuning
    run = SelfImprovementRun(model=settings.model.name, method=tuning.method, replay=replay, gate=use_gate,
                             attempts=attempts, eval_limit=eval_limit, train_questions=_count(split.train),
                             abstain_goals=abstain_goals, near_miss_goals=near_miss_goals,
                             call_required_attempts=call_required_attempts, calibration_goals=calibration_count,
                             kl_weight=tuning.kl_weight if replay else 0.0,
                             anchor_file=tuning.anchor_file.name if replay and tuning.anchor_file else None,
                             anchor_weight=tuning.anchor_weight if replay and tuning.anchor_file else 0.0,
                             continue_from_active=tuning.continue_from_active,
                             max_abstention_share=tuning.max_abstention_share,
                             min_abstention_share=tuning.min_abstention_share, lora_scale=tuning.lora_scale,
                             no_call_slack=tuning.no_call_slack, dtype=resolve_dtype(settings.model.dtype))
    if resume is not None:
        run = _resumable(run, resume, work_dir)
    chat = _local_chat(settings)
    model, tokenizer = chat.model, chat.tokenizer
    reference = tuning.reference_file.read_text()
    abstain = abstention_goals(split, abstain_goals, near_miss_goals, settings.memory.embedding_model)
    general = load_replay_file(tuning.replay_file) if replay and tuning.replay_file else []
    with _work_dir(work_dir) as root, EpisodeStore(root / "episodes.sqlite3") as store:
        registry = AdapterRegistry(root / "adapters")
        calibration_set = (calibration_goals(split, calibration_count, eval_limit, tuning.seed)
                           if calibration_count else ([], []))
        if run.rounds:
            chat.use_adapter(registry.active_path(), registry.active_version())
            base, active = (_recorded_suites(r.active, split, eval_limit) for r in (run.rounds[0], run.rounds[-1]))
            base_ce = run.rounds[0].reference_ce
            active_refused = next((r.calibration.refused for r in reversed(run.rounds)
                                   if r.decision == "promoted" and r.calibration), run.base_refused)
        else:
            start = time.perf_counter()
            active = base = _evaluate(chat, split, eval_limit, tuning.seed)
            base_ce = chat.cross_entropy(reference)  # the gate bounds drift from the base, not from the active model
            if calibration_count:
                run.base_refused = refusal_share([no_call_margin(chat, q) for q in calibration_set[0]], 0.0)
            active_refused = run.base_refused
            run.rounds.append(BenchRound(
                round=0, decision="base", candidate={k: v.accuracy for k, v in active.items()},
                active={k: v.accuracy for k, v in active.items()}, reference_ce=base_ce,
                seconds=PhaseSeconds(evaluate=round(time.perf_counter() - start, 1))))
            if on_round:
                on_round(run)
        for number in range(len(run.rounds), rounds + 1):
            seconds = PhaseSeconds()
            start = time.perf_counter()
            total, solved, required_solved = _collect(store, chat, split, attempts, temperature, abstain,
                                                      call_required_attempts)
            seconds.collect = round(time.perf_counter() - start, 1)

            start = time.perf_counter()
            selection = select_episodes(store, tuning)
            earlier = earlier_training_data(registry, store) if replay else []
            episodes, mix = mix_replay(selection.training_episodes(), earlier, general,
                                       tuning.replay_ratio if replay else 0.0, tuning.replay_general_share,
                                       tuning.seed + number)
            examples = build_examples(episodes, tokenizer, tuning.max_seq_len)
            anchors = anchor_examples(tuning.anchor_file, tokenizer, tuning.anchor_max_tokens) if replay else []
            result = BenchRound(round=number, decision="skipped", attempts=total, solved_attempts=solved,
                                call_required_solved=required_solved,
                                selected=len(selection.selected), abstentions=selection.abstentions,
                                oversampled=len(selection.oversampled), replayed=mix.earlier + mix.general,
                                learning_rate=tuning.learning_rate, max_steps=tuning.max_steps)
            if not examples:
                result.reason = "no episode solved"
                result.active = {k: v.accuracy for k, v in active.items()}
                result.seconds = seconds
                run.rounds.append(result)
                continue
            previous = registry.active_path()
            start_from = registry.continuation_point(tuning.method) if tuning.continue_from_active else None
            version, out_dir = registry.allocate()
            chat.use_adapter(None)
            train_adapter(model, tokenizer, examples + anchors, tuning, out_dir, start_from=start_from)
            seconds.train = round(time.perf_counter() - start, 1)

            start = time.perf_counter()
            chat.use_adapter(out_dir, version)
            if calibration_count:
                result.calibration = calibrate_adapter(chat, out_dir, version, calibration_set, calibration_target(
                    run.base_refused, active_refused, slack=tuning.no_call_slack))
            candidate = _evaluate(chat, split, eval_limit, tuning.seed)
            candidate_ce = chat.cross_entropy(reference)
            seconds.evaluate = round(time.perf_counter() - start, 1)
            regressions = [(regression_baseline(active[name], base[name]), candidate[name], regression_tolerance)
                           for name in UNTRAINED_SUITES]
            decision, reason = gate(active[HELDOUT], candidate[HELDOUT], tuning.promote_margin, base_ce,
                                    candidate_ce, tuning.reference_tolerance_nats, regressions)
            if not use_gate:
                decision, reason = "promoted", f"gate off ({decision}: {reason})"
            registry.register(AdapterVersion(
                version=version, method=tuning.method, base_model=settings.model.name, path=out_dir,
                metrics={HELDOUT + "_after": candidate[HELDOUT].accuracy},
                trained_on=list(dict.fromkeys(e.id for e in episodes if e.origin != "replay"))))
            if decision == "promoted":
                registry.promote(version, reason)
                active = candidate
                active_refused = result.calibration.refused if result.calibration else active_refused
            else:
                registry.reject(version, reason)
                chat.use_adapter(previous)
            result.decision, result.reason = decision, reason
            result.candidate = {k: v.accuracy for k, v in candidate.items()}
            result.active = {k: v.accuracy for k, v in active.items()}
            result.reference_ce, result.seconds = candidate_ce, seconds
            run.rounds.append(result)
            if on_round:
                on_round(run)
    return run


def _resumable(run: SelfImprovementRun, recorded: SelfImprovementRun, work_dir: Path | None) -> SelfImprovementRun:
    """``recorded``, checked to have been run with ``run``'s options and to have its work in ``work_dir``:
    the episodes, and one registered adapter per trained round with that round's decision."""
    if work_dir is None or not (Path(work_dir) / "episodes.sqlite3").is_file():
        raise ValueError("resuming needs the recorded run's work dir (its episodes and adapters)")
    if not recorded.rounds or recorded.rounds[0].decision != "base":
        raise ValueError("the recorded run has no base evaluation to resume from")
    options = set(SelfImprovementRun.model_fields) - {"rounds", "base_refused"}
    differing = sorted(name for name in options if getattr(run, name) != getattr(recorded, name))
    if differing:
        raise ValueError("the recorded run differs in " + ", ".join(
            f"{name} ({getattr(recorded, name)!r}, now {getattr(run, name)!r})" for name in differing))
    registered = [entry.status for entry in AdapterRegistry(Path(work_dir) / "adapters").list()]
    decided = [r.decision for r in recorded.rounds if r.decision in ("promoted", "rejected")]
    if registered != decided:
        raise ValueError(f"the work dir's adapters ({', '.join(registered) or 'none'}) do not match the "
                         f"recorded rounds' decisions ({', '.join(decided) or 'none'})")
    return recorded.model_copy(deep=True)


def _recorded_suites(accuracies: Mapping[str, float], split: Split, eval_limit: int) -> dict[str, SuiteResult]:
    """Suite results as a recorded round holds them (accuracies), with the sizes :func:`_evaluate` used."""
    sizes = {f"{HELDOUT}:{category}": len(ids) for category, ids in split.heldout.items()}
    sizes[HELDOUT] = sum(sizes.values())
    sizes.update({category: len(load_category(category, limit=eval_limit)) for category in UNTRAINED_SUITES})
    return {name: SuiteResult(name=name, accuracy=accuracy, n=sizes[name], passed=round(accuracy * sizes[name]))
            for name, accuracy in accuracies.items()}


def _question_id(episode: Episode) -> str:
    """The BFCL question id an attempt's episode was collected for (its goal, see :func:`record_attempt`)."""
    return episode.goal.split(": ", 1)[0]


def _exemplar_text(question: BfclQuestion) -> str:
    """What an exemplar is indexed and looked up by: the request and the names of the functions offered."""
    names = ", ".join(tool["function"]["name"] for tool in question.tools())
    return f"{question.messages[-1].content}\nFunctions: {names}"


def _offered(question: BfclQuestion) -> str:
    """An exemplar's request with the functions it was offered, so a call or a refusal reads as right."""
    functions = "\n".join(f"- {tool['function']['name']}: {tool['function'].get('description', '')}"
                          for tool in question.tools())
    return f"Functions offered:\n{functions}\nRequest: {question.messages[-1].content}"


def _exemplar_memory(store: EpisodeStore, memory: VectorMemory, k: int,
                     goals: Mapping[str, BfclQuestion]) -> Callable[[BfclQuestion], list[BaseMessage]]:
    """Index the solved collection episodes, one per request and offered functions (``goals``: the
    collected questions by id); return a BFCL ``exemplars`` function: the ``k`` closest as turns that
    show the functions each was offered, so a refusal comes with the functions that did not fit."""
    seen: set[str] = set()
    for episode in store.scored(min_score=1.0):
        text = _exemplar_text(goals[_question_id(episode)])
        if text not in seen:
            seen.add(text)
            memory.add([text], kind="exemplar", episode_id=episode.id)

    def exemplars(question: BfclQuestion) -> list[BaseMessage]:
        turns: list[BaseMessage] = []
        for hit in reversed(memory.search(_exemplar_text(question), k=k)):  # the closest one last
            episode = store.get(hit.episode_id)
            turns += [HumanMessage(content=_offered(goals[_question_id(episode)])),
                      AIMessage(content=episode.steps[2].message.content)]
        return turns

    return exemplars


def run_fewshot_baseline(
    settings: Settings,
    attempts: int = 4,
    temperature: float = 0.7,
    eval_limit: int = 50,
    shots: int = 2,
    abstain_goals: int = 20,
    near_miss_goals: int = 0,
    split: Split | None = None,
    work_dir: Path | None = None,
    on_round: Any = None,
) -> SelfImprovementRun:
    """Base evaluation, one collection round, then evaluation with ``shots`` retrieved exemplars;
    ``on_round(run)`` after each of the two."""
    split = split or Split.model_validate_json(SPLIT_FILE.read_text())
    chat = _local_chat(settings)
    run = SelfImprovementRun(model=settings.model.name, method=f"fewshot-{shots}", replay=False, gate=False,
                             attempts=attempts, eval_limit=eval_limit, train_questions=_count(split.train),
                             abstain_goals=abstain_goals, near_miss_goals=near_miss_goals,
                             dtype=resolve_dtype(settings.model.dtype))
    with _work_dir(work_dir) as root, EpisodeStore(root / "episodes.sqlite3") as store:
        start = time.perf_counter()
        base = {k: v.accuracy for k, v in _evaluate(chat, split, eval_limit, settings.tuning.seed).items()}
        run.rounds.append(BenchRound(round=0, decision="base", candidate=base, active=base,
                                     seconds=PhaseSeconds(evaluate=round(time.perf_counter() - start, 1))))
        if on_round:
            on_round(run)
        seconds = PhaseSeconds()
        start = time.perf_counter()
        abstain = abstention_goals(split, abstain_goals, near_miss_goals, settings.memory.embedding_model)
        total, solved, _ = _collect(store, chat, split, attempts, temperature, abstain)
        memory = VectorMemory(root / "chroma", "exemplars", settings.memory.embedding_model)
        goals = {question.id: question for question, _ in train_questions(split) + abstain}
        exemplars = _exemplar_memory(store, memory, shots, goals)
        seconds.collect = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        shot = {k: v.accuracy for k, v in _evaluate(chat, split, eval_limit, settings.tuning.seed, exemplars).items()}
        seconds.evaluate = round(time.perf_counter() - start, 1)
        run.rounds.append(BenchRound(round=1, decision="baseline", reason=f"{shots} retrieved exemplars",
                                     candidate=shot, active=shot, attempts=total, solved_attempts=solved,
                                     seconds=seconds))
        if on_round:
            on_round(run)
    return run
