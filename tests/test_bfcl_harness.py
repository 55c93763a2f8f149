"""The BFCL evaluation harness (selftune.bfcl.harness): prompt, parsing, name mapping, scoring,
and a constrained run of the real SmolLM2 on two small samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool

from selftune.agent.local_chat import LocalChatModel
from selftune.agent.models import load_causal_lm
from selftune.agent.prompts import tool_signature
from selftune.agent.transcript import format_tool_call
from selftune.bfcl import gold_calls, load_category, tool_name
from selftune.bfcl.harness import (
    BfclRun,
    CategoryResult,
    QuestionRecord,
    build_messages,
    evaluate_category,
    score_reply,
)
from selftune.memory.records import ToolCall

SMOL = "smollm2-135m-instruct"
RECORD_FIELDS = {"id", "valid", "error", "calls", "raw"}


def _gold_text(question, answer) -> str:
    """The gold calls as the model is asked to write them (sanitised names, canonical JSON)."""
    calls = [format_tool_call(ToolCall(name=tool_name(n), arguments=a)) for n, a in gold_calls(question, answer)]
    return calls[0] if len(calls) == 1 else "[" + ", ".join(calls) + "]"


# --- pure: prompt, parsing, mapping, scoring ---------------------------------------------------


def test_function_signature_matches_agent_tool_signature() -> None:
    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    from langchain_core.utils.function_calling import convert_to_openai_tool

    assert tool_signature(convert_to_openai_tool(add)) == tool_signature(add)


def test_prompt_lists_functions_and_keeps_user_turns() -> None:
    question, _ = load_category("multiple", limit=1, seed=0)[0]
    messages = build_messages(question)
    assert isinstance(messages[0], SystemMessage)
    for sanitised in (t["function"]["name"] for t in question.tools()):
        assert f'"name": "{sanitised}"' in messages[0].content
    assert '"tool": "none"' in messages[0].content
    assert [m.content for m in messages[1:]] == [m.content for m in question.messages if m.role != "system"]
    assert all(isinstance(m, HumanMessage) for m in messages[1:])


def test_gold_reply_scores_valid_with_dotted_names() -> None:
    entries = load_category("simple_python", limit=40, seed=0)
    dotted = [(q, a) for q, a in entries if "." in q.functions[0]["name"]]
    assert dotted, "sample should contain a dotted BFCL name such as math.factorial"
    for question, answer in entries[:5] + dotted[:2]:
        parsed, calls, result = score_reply(question, answer, _gold_text(question, answer))
        assert parsed and result.valid, (question.id, result)
        assert calls[0][0] == next(iter(answer.ground_truth[0]))  # BFCL's own name


def test_gold_list_reply_scores_valid_on_parallel() -> None:
    question, answer = load_category("parallel", limit=1, seed=0)[0]
    text = "Here you go: " + _gold_text(question, answer)
    parsed, calls, result = score_reply(question, answer, text)
    assert parsed and len(calls) == len(answer.ground_truth) > 1 and result.valid


def test_no_call_reply_on_irrelevance_and_failures() -> None:
    question, answer = load_category("irrelevance", limit=1, seed=0)[0]
    assert answer is None
    parsed, calls, result = score_reply(question, answer, '{"tool": "none", "arguments": {"reason": "no fit"}}')
    assert parsed and calls == [] and result.valid
    fn = question.tools()[0]["function"]["name"]
    parsed, calls, result = score_reply(question, answer, json.dumps({"tool": fn, "arguments": {}}))
    assert parsed and len(calls) == 1 and not result.valid

    simple, gold = load_category("simple_python", limit=1, seed=0)[0]
    parsed, calls, result = score_reply(simple, gold, "I cannot answer that.")
    assert not parsed and calls == [] and not result.valid
    parsed, _, result = score_reply(simple, gold, '{"tool": "none", "arguments": {"reason": "x"}}')
    assert parsed and not result.valid


class _Replay:
    """A chat stub that answers every question with its gold call (unconstrained path only)."""

    def __init__(self, category: str) -> None:
        self.gold = {q.id: (q, a) for q, a in load_category(category)}
        self.seen: list[dict[str, Any]] = []

    def invoke(self, messages, **options: Any) -> AIMessage:
        self.seen.append(options)
        text = messages[-1].content
        question, answer = next(qa for qa in self.gold.values() if qa[0].messages[-1].content == text)
        return AIMessage(content=_gold_text(question, answer), usage_metadata={
            "input_tokens": 1, "output_tokens": 7, "total_tokens": 8}, response_metadata={"latency_s": 0.5})


def test_parallel_categories_ask_for_a_list_of_calls() -> None:
    question, _ = load_category("parallel", limit=1, seed=0)[0]
    several = build_messages(question, several_calls=True)[0].content
    one = build_messages(question)[0].content
    assert "JSON list of calls and nothing else" in several and "one JSON object" not in several
    assert "one JSON object" in one and "JSON list of calls and nothing else" not in one
    assert several.split("\n")[1:-3] == one.split("\n")[1:-3]  # the same functions either way


def test_evaluate_category_uses_the_list_prompt_in_parallel_categories() -> None:
    stub = _Replay("parallel")
    stub.seen_prompts = []
    invoke = stub.invoke

    def recording(messages, **options):
        stub.seen_prompts.append(messages[0].content)
        return invoke(messages, **options)

    stub.invoke = recording
    result = evaluate_category(stub, "parallel", limit=2, seed=0, constrained=False)
    assert result.accuracy == 1.0
    assert all("JSON list of calls and nothing else" in prompt for prompt in stub.seen_prompts)


def test_evaluate_category_skips_questions_already_done() -> None:
    stub = _Replay("simple_python")
    first = evaluate_category(stub, "simple_python", limit=2, seed=0, constrained=False)
    earlier = {r.id: r.model_copy(update={"raw": "from an earlier run"}) for r in first.records}
    asked = len(stub.seen)
    result = evaluate_category(stub, "simple_python", limit=3, seed=0, constrained=False, done=earlier)
    assert len(stub.seen) == asked + 1  # only the question not scored before
    assert [r.raw for r in result.records].count("from an earlier run") == 2 and result.n == 3
    kept = [r for r in result.records if r.raw == "from an earlier run"]
    assert all(not r.valid and not r.parsed for r in kept)  # scored again, by the current rules


def test_null_for_an_optional_parameter_is_scored_as_left_out() -> None:
    """A model writes null for a parameter it leaves empty: the call leaves it out (as in the agent)."""
    for question, answer in load_category("simple_python"):
        function = question.functions[0]
        required = function["parameters"].get("required", [])
        expected = next(iter(answer.ground_truth[0].values()))
        optional = [p for p in function["parameters"]["properties"] if p not in required and "" in expected.get(p, [""])]
        if len(question.functions) == 1 and len(answer.ground_truth) == 1 and optional and required:
            break
    name, arguments = gold_calls(question, answer)[0]
    with_null = {**arguments, optional[0]: None}
    reply = format_tool_call(ToolCall(name=tool_name(name), arguments=with_null))
    parsed, calls, result = score_reply(question, answer, reply)
    assert parsed and result.valid and optional[0] not in calls[0][1]
    required_null = format_tool_call(ToolCall(name=tool_name(name), arguments={**arguments, required[0]: None}))
    assert not score_reply(question, answer, required_null)[2].valid  # a required parameter is never dropped


def test_evaluate_category_asks_exactly_the_given_ids() -> None:
    stub = _Replay("multiple")
    ids = [q.id for q, _ in load_category("multiple")][5:8]
    result = evaluate_category(stub, "multiple", ids=ids, constrained=False)
    assert [r.id for r in result.records] == ids and result.accuracy == 1.0
    with pytest.raises(ValueError, match="1 of the given ids are not in multiple"):
        evaluate_category(stub, "multiple", ids=ids + ["simple_python_0"], constrained=False)


def test_evaluate_category_aggregates_unconstrained() -> None:
    stub = _Replay("simple_python")
    result = evaluate_category(stub, "simple_python", limit=4, seed=1, constrained=False)
    assert (result.n, result.accuracy, result.parse_rate) == (4, 1.0, 1.0)
    assert result.mean_latency_s == 0.5 and result.mean_output_tokens == 7.0
    assert all("tools" not in options and options["temperature"] == 0.0 for options in stub.seen)
    assert [r.id for r in result.records] == [q.id for q, _ in load_category("simple_python", limit=4, seed=1)]


# --- real SmolLM2, grammar-constrained ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_chat(model_cache: Path) -> LocalChatModel:
    model, tokenizer = load_causal_lm(SMOL, model_cache)
    return LocalChatModel(model=model, tokenizer=tokenizer, model_id=SMOL)


@pytest.mark.parametrize(("category", "limit"), [("simple_python", 3), ("irrelevance", 2)])
def test_constrained_smollm2_always_parses(smol_chat: LocalChatModel, category: str, limit: int) -> None:
    result = evaluate_category(smol_chat, category, limit=limit, seed=0, constrained=True, max_new_tokens=96)
    assert isinstance(result, CategoryResult)
    assert result.category == category and result.n == limit and result.constrained
    assert result.parse_rate == 1.0
    assert 0.0 <= result.accuracy <= 1.0 and result.mean_latency_s > 0 and result.mean_output_tokens > 0
    assert result.model_id == SMOL
    names = {f["name"] for q, _ in load_category(category, limit=limit, seed=0) for f in q.functions}
    for record in result.records:
        assert isinstance(record, QuestionRecord) and RECORD_FIELDS <= set(record.model_dump())
        assert record.parsed and record.raw.lstrip().startswith("{")
        assert all(call["name"] in names for call in record.calls)  # mapped back to BFCL's names
        assert len(record.calls) <= 1  # constrained decoding: one call or the no-call answer
        assert record.valid == (record.error is None)
    json.loads(result.model_dump_json())  # what --out writes


def test_constrained_parallel_replies_may_be_lists_and_always_parse(smol_chat: LocalChatModel) -> None:
    result = evaluate_category(smol_chat, "parallel", limit=2, seed=0, constrained=True, max_new_tokens=128)
    assert result.parse_rate == 1.0
    for record in result.records:
        reply = json.loads(record.raw)
        calls = reply if isinstance(reply, list) else [reply]
        assert 1 <= len(calls) <= 8 and all(set(call) == {"tool", "arguments"} for call in calls)


def test_cli_eval_bfcl_prints_table_and_writes_json(
    smol_chat: LocalChatModel, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    # smol_chat: the model is already converted into the session cache the CLI is pointed at.
    monkeypatch.setenv("SELFTUNE_MODEL_CACHE", str(model_cache))
    out = tmp_path / "bfcl.json"
    result = CliRunner().invoke(
        app, ["eval", "bfcl", "--category", "irrelevance", "--category", "simple_python", "--limit", "1",
              "--model", SMOL, "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "irrelevance" in result.output and "simple_python" in result.output and "parse rate" in result.output
    saved = BfclRun.model_validate_json(out.read_text())
    assert saved.constrained and saved.limit == 1 and saved.model == SMOL
    assert [r.category for r in saved.results] == ["irrelevance", "simple_python"]
    assert all(r.n == 1 and r.parse_rate == 1.0 for r in saved.results)


def test_cli_eval_bfcl_rejects_unknown_category_before_loading_a_model(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    result = CliRunner().invoke(app, ["eval", "bfcl", "--category", "simple_python", "--category", "no_such_category",
                                      "--model", "hf:/nonexistent"])
    assert result.exit_code != 0
    assert "no_such_category" in str(result.exception or result.output)


def test_cli_eval_bfcl_resume_keeps_earlier_questions_and_refuses_other_settings(
    smol_chat: LocalChatModel, model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from selftune.cli import app

    monkeypatch.setenv("SELFTUNE_MODEL_CACHE", str(model_cache))
    out = tmp_path / "bfcl.json"
    base = ["eval", "bfcl", "--model", SMOL, "--out", str(out)]
    assert CliRunner().invoke(app, base + ["--category", "irrelevance", "--category", "simple_python",
                                           "--limit", "1"]).exit_code == 0
    first = BfclRun.model_validate_json(out.read_text())
    marked = first.model_copy(deep=True)
    marked.results[1].records[0].raw = "kept from the first run"
    out.write_text(marked.model_dump_json())

    result = CliRunner().invoke(app, base + ["--category", "simple_python", "--limit", "2", "--resume"])
    assert result.exit_code == 0, result.output
    resumed = BfclRun.model_validate_json(out.read_text())
    assert [r.category for r in resumed.results] == ["irrelevance", "simple_python"]  # irrelevance kept as it was
    assert resumed.results[0] == first.results[0]
    records = resumed.results[1].records
    assert len(records) == 2 and [r.raw for r in records].count("kept from the first run") == 1

    refused = CliRunner().invoke(app, base + ["--category", "simple_python", "--limit", "2", "--resume",
                                              "--unconstrained"])
    assert refused.exit_code != 0 and "constrained=True" in refused.output
    assert BfclRun.model_validate_json(out.read_text()) == resumed  # nothing lost
