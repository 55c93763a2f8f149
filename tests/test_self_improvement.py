"""The self-improvement benchmark on the real SmolLM2, shrunk to one tiny round: goals collected and
scored by the BFCL checker, a LoRA candidate trained, evaluated on every suite, gated, recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selftune.agent.constrained import NO_CALL_TOOL
from selftune.agent.local_chat import DECODING_FILE, AdapterDecoding
from selftune.bench.self_improvement import (
    CALL_REQUIRED_ORIGIN,
    HELDOUT,
    SPLIT_FILE,
    TRAIN_CATEGORIES,
    UNTRAINED_SUITES,
    BenchRound,
    SelfImprovementRun,
    Split,
    abstention_goals,
    calibration_goals,
    make_split,
    run_fewshot_baseline,
    run_self_improvement,
    widen_train,
)
from selftune.bfcl import load_category
from selftune.bfcl.mismatch import functions_text
from selftune.memory.episodes import EpisodeStore
from selftune.settings import load_settings
from selftune.tuning.calibration import BIAS_GRID


def test_committed_split_is_the_seeded_split_and_disjoint() -> None:
    committed = Split.model_validate_json(SPLIT_FILE.read_text())
    assert committed == make_split(committed.seed)
    for category in TRAIN_CATEGORIES:
        train, heldout = set(committed.train[category]), set(committed.heldout[category])
        assert len(train) == 40 and len(heldout) == 30 and not train & heldout


def test_widened_train_keeps_held_out_and_adds_only_unused_questions() -> None:
    committed = Split.model_validate_json(SPLIT_FILE.read_text())
    wide = widen_train(committed, 80)
    assert wide.heldout == committed.heldout and wide == widen_train(committed, 80)
    for category in TRAIN_CATEGORIES:
        train = set(wide.train[category])
        assert len(train) == 80 and train >= set(committed.train[category])
        assert not train & set(committed.heldout[category])
    assert widen_train(committed, 40) == committed
    with pytest.raises(ValueError, match="cannot shrink"):
        widen_train(committed, 39)
    with pytest.raises(ValueError, match="multiple has only 130 questions outside the split"):
        widen_train(committed, 171)


def test_bench_self_improvement_rejects_a_train_split_larger_than_the_data() -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    result = CliRunner().invoke(app, ["bench", "self-improvement", "--train-per-category", "500"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "simple_python has only 330 questions outside the split" in result.output


def test_abstention_goals_offer_another_categorys_functions_and_want_no_call() -> None:
    from selftune.bfcl import check

    split = make_split(0)
    goals = abstention_goals(split, 10)
    assert len(goals) == 10 and len({q.id for q, _ in goals}) == 10
    train = {q.id: q for category in TRAIN_CATEGORIES for q, _ in load_category(category)
             if q.id in split.train[category]}
    for goal, answer in goals:
        original = train[goal.id.removesuffix("~none")]
        assert answer is None and goal.category == "irrelevance" and goal.messages == original.messages
        assert {f["name"] for f in goal.functions}.isdisjoint({f["name"] for f in original.functions})
        assert check(goal, None, []).valid and not check(goal, None, [(goal.functions[0]["name"], {})]).valid
    assert abstention_goals(split, 0) == []


def test_near_miss_goals_offer_closer_reading_functions_that_still_do_not_fit() -> None:
    import numpy as np

    from selftune.memory.embeddings import LocalSentenceTransformerEmbedding

    split = make_split(0)
    goals = abstention_goals(split, 10, near_miss=10)
    far, near = [q for q, _ in goals if q.id.endswith("~none")], [q for q, _ in goals if q.id.endswith("~near")]
    assert len(far) == len(near) == 10
    assert len({q.id.split("~")[0] for q, _ in goals}) == 20  # near misses use questions the far ones do not
    train = {q.id: q for category in TRAIN_CATEGORIES for q, _ in load_category(category)
             if q.id in split.train[category]}
    offered = {tuple(f["name"] for f in q.functions) for q in train.values()}
    for goal in near:
        original = train[goal.id.removesuffix("~near")]
        assert goal.category == "irrelevance" and goal.messages == original.messages
        assert tuple(f["name"] for f in goal.functions) in offered  # another train question's functions
        assert {f["name"] for f in goal.functions}.isdisjoint({f["name"] for f in original.functions})

    embed = LocalSentenceTransformerEmbedding()

    def closeness(questions: list) -> float:
        asks = np.array(embed([q.messages[-1].content for q in questions]))
        offers = np.array(embed([functions_text(q) for q in questions]))
        return float(np.mean(np.sum(asks * offers, axis=1)))

    assert closeness(near) > closeness(far) + 0.1


def _tiny_settings(tmp_path: Path, model_cache: Path, **tuning: object):
    return load_settings(data_dir=tmp_path / "data", model_cache=model_cache, model={"name": "smollm2-135m-instruct"},
                         tuning={"max_steps": 1, "batch_size": 2, "min_score": 0.0,
                                 "lora_target_modules": ["q_proj", "v_proj"], **tuning})


def test_one_tiny_round_collects_trains_evaluates_and_gates(model_cache: Path, tmp_path: Path) -> None:
    split = Split(seed=0, train={"simple_python": make_split(0).train["simple_python"][:2]},
                  heldout={"simple_python": make_split(0).heldout["simple_python"][:1]})
    settings = _tiny_settings(tmp_path, model_cache, kl_weight=1.0, no_call_slack=0.25)
    seen = []
    run = run_self_improvement(settings, rounds=1, attempts=2, eval_limit=1, abstain_goals=1, near_miss_goals=1,
                               call_required_attempts=1, calibration_count=2, split=split,
                               work_dir=tmp_path / "work",
                               on_round=lambda r: seen.append(len(r.rounds)))
    assert seen == [1, 2] and run.abstain_goals == run.near_miss_goals == 1 and run.kl_weight == 1.0
    assert run.train_questions == 2 and run.call_required_attempts == 1
    base, first = run.rounds
    suites = {f"{HELDOUT}:simple_python", HELDOUT, *UNTRAINED_SUITES}
    assert base.decision == "base" and set(base.active) == suites and base.reference_ce > 0
    # 2 goals + 1 far + 1 near, twice each, then each goal once more with a call required
    assert first.attempts == 10 and first.call_required_solved <= min(first.solved_attempts, 2)
    assert first.selected >= 1
    assert first.replayed >= 1  # general/abstention conversations mixed in
    assert first.decision in ("promoted", "rejected") and "held-out accuracy" in first.reason
    assert set(first.candidate) == suites and first.seconds.collect > 0 and first.seconds.train > 0
    expected_active = first.candidate if first.decision == "promoted" else base.active
    assert first.active == expected_active
    json.loads(run.model_dump_json())

    with EpisodeStore(tmp_path / "work" / "episodes.sqlite3") as store:
        episodes = store.scored(min_score=0.0)
    assert len(episodes) == 10
    required = [e for e in episodes if e.origin == CALL_REQUIRED_ORIGIN]
    assert len(required) == 2 and all(e.origin == "bfcl-train" for e in episodes if e not in required)
    assert all(e.steps[-1].message.tool_calls and e.steps[-1].message.tool_calls[0].name != NO_CALL_TOOL
               for e in required)  # the no-call answer was withheld: every reply is a call
    assert sum(e.rewards[0].value for e in required) == first.call_required_solved
    assert sum("~none:" in e.goal for e in episodes) == sum("~near:" in e.goal for e in episodes) == 2
    assert all(e.rewards[0].source == "verifier" for e in episodes)
    assert not any(split.heldout["simple_python"][0] + ":" in e.goal for e in episodes)  # held-out never collected
    registry = json.loads((tmp_path / "work" / "adapters" / "registry.json").read_text())
    assert registry["versions"]["v0001"]["status"] == first.decision
    # The candidate was evaluated with its calibrated no-call bias, saved beside its weights.
    assert run.calibration_goals == 2 and run.base_refused in (0.0, 0.5, 1.0)
    assert first.calibration is not None and first.calibration.abstain_questions == 2
    assert first.calibration.refused >= first.calibration.target or first.calibration.bias == max(BIAS_GRID)
    # Held to the base model here (nothing promoted yet), less the slack; the base model refuses
    # held-back live_irrelevance questions (0.88 of 100 measured).
    assert run.base_refused > 0  # so the slack shows in the target
    assert run.no_call_slack == 0.25 and first.calibration.target == pytest.approx(max(0.0, run.base_refused - 0.25))
    decoding = AdapterDecoding.model_validate_json(
        (tmp_path / "work" / "adapters" / "v0001" / DECODING_FILE).read_text())
    assert decoding.no_call_bias == first.calibration.bias


def test_a_resumed_run_keeps_its_rounds_and_goes_on_from_the_active_adapter(model_cache: Path, tmp_path: Path) -> None:
    split = Split(seed=0, train={"simple_python": make_split(0).train["simple_python"][:2]},
                  heldout={"simple_python": make_split(0).heldout["simple_python"][:1]})
    options = dict(attempts=1, eval_limit=1, abstain_goals=1, split=split, work_dir=tmp_path / "work")
    first = run_self_improvement(_tiny_settings(tmp_path, model_cache), rounds=1, use_gate=False, **options)
    assert [r.decision for r in first.rounds] == ["base", "promoted"] and first.rounds[1].max_steps == 1

    recorded = SelfImprovementRun.model_validate_json(first.model_dump_json())
    seen = []
    resumed = run_self_improvement(_tiny_settings(tmp_path, model_cache, max_steps=2, learning_rate=1e-4), rounds=2,
                                   use_gate=False, resume=recorded, on_round=lambda r: seen.append(len(r.rounds)),
                                   **options)
    assert seen == [3]  # no second base evaluation: only the new round is reported
    assert resumed.rounds[:2] == first.rounds and [r.round for r in resumed.rounds] == [0, 1, 2]
    second = resumed.rounds[2]
    assert (second.decision, second.max_steps, second.learning_rate) == ("promoted", 2, 1e-4)
    assert second.attempts == 3  # collected again by the promoted adapter: 2 goals + 1 abstention goal
    registry = json.loads((tmp_path / "work" / "adapters" / "registry.json").read_text())
    assert sorted(registry["versions"]) == ["v0001", "v0002"] and registry["active"] == "v0002"
    with EpisodeStore(tmp_path / "work" / "episodes.sqlite3") as store:
        episodes = store.scored(min_score=0.0)
    assert {e.adapter_version for e in episodes} == {None, "v0001"}  # round 2 collected with v0001 active


def test_resuming_refuses_other_options_or_a_work_dir_that_does_not_match(tmp_path: Path) -> None:
    work = tmp_path / "work"
    settings = load_settings(data_dir=tmp_path / "data", model={"name": "smollm2-135m-instruct", "dtype": "float32"})
    recorded = SelfImprovementRun(model="smollm2-135m-instruct", method="lora", replay=True, gate=True, attempts=1,
                                  eval_limit=1, train_questions=2, dtype="float32",
                                  max_abstention_share=settings.tuning.max_abstention_share,
                                  rounds=[BenchRound(round=0, decision="base"),
                                          BenchRound(round=1, decision="promoted")])
    split = Split(seed=0, train={"simple_python": make_split(0).train["simple_python"][:2]},
                  heldout={"simple_python": make_split(0).heldout["simple_python"][:1]})

    def resume(**options: object) -> None:
        run_self_improvement(settings, **{"attempts": 1, "eval_limit": 1, "abstain_goals": 0, "split": split,
                                          "work_dir": work, "resume": recorded, **options})

    with pytest.raises(ValueError, match="work dir"):
        resume()  # nothing collected there
    EpisodeStore(work / "episodes.sqlite3").close()
    with pytest.raises(ValueError, match=r"differs in attempts \(1, now 2\), eval_limit \(1, now 3\)$"):
        resume(attempts=2, eval_limit=3)
    with pytest.raises(ValueError, match=r"adapters \(none\) do not match the recorded rounds' decisions \(promoted\)"):
        resume()


def test_calibration_goals_lie_outside_the_split_and_every_evaluated_sample() -> None:
    split = widen_train(make_split(0), 100)
    abstain, call = calibration_goals(split, 6, eval_limit=240, seed=0)
    trained = {i for ids in (*split.train.values(), *split.heldout.values()) for i in ids}
    evaluated = {q.id for c in UNTRAINED_SUITES for q, _ in load_category(c, limit=240, seed=0)}
    assert len(abstain) == len(call) == 6 and len({q.id for q in abstain + call}) == 12
    assert {q.category for q in abstain} == {"live_irrelevance"} and {q.category for q in call} == set(TRAIN_CATEGORIES)
    assert not {q.id for q in abstain + call} & (trained | evaluated)
    with pytest.raises(ValueError, match="wants 700 questions of live_irrelevance"):
        calibration_goals(split, 700, eval_limit=240, seed=0)  # 884 - 240 are left


def test_bench_self_improvement_rejects_an_unknown_method() -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    result = CliRunner().invoke(app, ["bench", "self-improvement", "--method", "ia3"])
    assert result.exit_code == 2 and "unknown tuning method 'ia3'" in result.output


def test_bench_self_improvement_resume_needs_a_recorded_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["bench", "self-improvement", "--resume", "--out", str(tmp_path / "none.json")])
    assert missing.exit_code == 2 and "needs the recorded run in --out" in missing.output
    other = tmp_path / "bfcl.json"
    other.write_text('{"model": "m", "limit": 1, "seed": 0, "constrained": true, "results": []}')
    wrong = runner.invoke(app, ["bench", "self-improvement", "--resume", "--out", str(other)])
    assert wrong.exit_code == 2 and "not a recorded run" in wrong.output
    assert json.loads(other.read_text())["model"] == "m"  # left as it was


def test_fewshot_baseline_evaluates_every_suite_with_exemplars(model_cache: Path, tmp_path: Path) -> None:
    split = Split(seed=0, train={"multiple": make_split(0).train["multiple"][:2]},
                  heldout={"multiple": make_split(0).heldout["multiple"][:1]})
    settings = load_settings(data_dir=tmp_path / "data", model_cache=model_cache,
                             model={"name": "smollm2-135m-instruct", "dtype": "float32"})
    # An abstention goal too: its episodes are looked up under its own id and offered functions.
    seen = []
    run = run_fewshot_baseline(settings, attempts=1, eval_limit=1, shots=1, abstain_goals=1, split=split,
                               work_dir=tmp_path / "work", on_round=lambda r: seen.append(len(r.rounds)))
    assert seen == [1, 2]  # the base evaluation is reported (and saved by the CLI) before collection starts
    base, shot = run.rounds
    assert (base.decision, shot.decision, run.method, run.dtype) == ("base", "baseline", "fewshot-1", "float32")
    assert set(shot.candidate) == set(base.candidate) and shot.attempts == 3


def test_exemplars_are_the_closest_solved_episodes_shown_with_the_functions_they_were_offered(
        tmp_path: Path) -> None:
    from selftune.bench.self_improvement import _exemplar_memory
    from selftune.bfcl import load_category
    from selftune.memory.records import ChatMessage, Episode, Reward, Step
    from selftune.memory.vector import VectorMemory

    def attempt(question, reply: str, value: float) -> Episode:
        episode_id = f"{question.id}-{value}"
        return Episode(id=episode_id, goal=f"{question.id}: {question.messages[-1].content}", status="done",
                       origin="bfcl-train", steps=[
            Step(index=0, kind="system", message=ChatMessage(role="system", content="functions")),
            Step(index=1, kind="goal", message=ChatMessage(role="user", content=question.messages[-1].content)),
            Step(index=2, kind="action", message=ChatMessage(role="assistant", content=reply), trainable=True),
        ], rewards=[Reward(episode_id=episode_id, source="verifier", value=value)])

    (target, _), (other, _) = load_category("simple_python", limit=2, seed=0)
    request = target.messages[0].model_copy(update={"content": target.messages[-1].content + " Please."})
    near = target.model_copy(update={"id": "near", "messages": [request]})
    refused = near.model_copy(update={"id": "near~none", "functions": other.functions})  # same request, unfit functions
    goals = {question.id: question for question in (near, refused, other)}
    with EpisodeStore(tmp_path / "episodes.sqlite3") as store:
        store.create_episode(attempt(near, '{"tool": "near"}', 1.0))
        store.create_episode(attempt(refused, '{"tool": "none"}', 1.0))
        store.create_episode(attempt(other, '{"tool": "other"}', 1.0))
        store.create_episode(attempt(near, '{"tool": "wrong"}', 0.0))
        exemplars = _exemplar_memory(store, VectorMemory(tmp_path / "chroma", "exemplars"), k=2, goals=goals)
        turns = exemplars(target)
    assert [t.type for t in turns] == ["human", "ai", "human", "ai"]
    # Both solved attempts of the same request are kept: the one offered the target's functions is closest.
    assert [t.content for t in turns[1::2]] == ['{"tool": "none"}', '{"tool": "near"}']
    offered = [{tool["function"]["name"] for tool in q.tools()} for q in (refused, near)]
    for turn, names in zip(turns[0::2], offered):
        assert turn.content.endswith("Request: " + request.content)
        assert all(f"- {name}: " in turn.content for name in names)
    assert offered[0].isdisjoint(offered[1])


def _report_script():
    import importlib.util

    from selftune.settings import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("self_improvement_report",
                                                  PROJECT_ROOT / "benchmarks" / "self_improvement_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_plot_marks_rejected_rounds_only_and_keeps_lines_past_a_skipped_round() -> None:
    from selftune.bench.self_improvement import BenchRound, SelfImprovementRun

    report = _report_script()
    scores = {suite: 0.5 for suite in report.SUITES}
    run = SelfImprovementRun(model="m", method="lora", replay=True, gate=True, attempts=1, eval_limit=1, rounds=[
        BenchRound(round=0, decision="base", candidate=scores),
        BenchRound(round=1, decision="skipped", reason="no episode solved"),
        BenchRound(round=2, decision="rejected", candidate=scores),
        BenchRound(round=3, decision="promoted", candidate=scores)])
    axes = report.plot(run).axes[0]
    assert [list(line.get_xdata()) for line in axes.lines] == [[0, 2, 3]] * len(report.SUITES)
    assert [list(c.get_offsets()[:, 0]) for c in axes.collections] == [[2]] * len(report.SUITES)
    assert "(ablation)" not in axes.get_title()

    baseline = run.model_copy(update={"method": "fewshot-2", "replay": False, "gate": False, "rounds": [
        BenchRound(round=0, decision="base", candidate=scores),
        BenchRound(round=1, decision="baseline", candidate=scores)]})
    axes = report.plot(baseline).axes[0]
    assert not axes.collections and "(ablation)" not in axes.get_title()
    assert "(ablation)" in report.plot(run.model_copy(update={"gate": False})).axes[0].get_title()


def test_report_plot_title_names_the_recipe_options_that_differ_from_the_defaults() -> None:
    from selftune.bench.self_improvement import BenchRound, SelfImprovementRun

    report = _report_script()
    run = SelfImprovementRun(model="m", method="lora", replay=True, gate=True, attempts=1, eval_limit=1, rounds=[
        BenchRound(round=0, decision="base", candidate={suite: 0.5 for suite in report.SUITES})])
    options = ("continued", "update x0.8", "no-call slack 0.02", "float32")
    default_title = report.plot(run).axes[0].get_title()
    assert not any(option in default_title for option in options)
    recipe = run.model_copy(update={"continue_from_active": True, "lora_scale": 0.8, "no_call_slack": 0.02,
                                    "dtype": "float32"})
    title = report.plot(recipe).axes[0].get_title().replace("\n", " ")
    assert all(option in title for option in options)


def test_report_table_notes_a_round_trained_with_another_step_than_the_first() -> None:
    report = _report_script()
    trained = BenchRound(round=1, decision="promoted", attempts=4, learning_rate=1e-4, max_steps=80,
                         candidate={suite: 0.5 for suite in report.SUITES})
    run = SelfImprovementRun(model="m", method="lora", replay=True, gate=True, attempts=1, eval_limit=1, rounds=[
        BenchRound(round=0, decision="base", candidate={suite: 0.5 for suite in report.SUITES}), trained,
        trained.model_copy(update={"round": 2}), trained.model_copy(update={"round": 3, "max_steps": 40})])
    rows = report.table(run).splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["base", "promoted", "promoted", "promoted (40 steps at 1e-4)"]
