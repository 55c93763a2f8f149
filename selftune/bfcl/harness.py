"""Run a local chat model on a BFCL category and score it with :func:`selftune.bfcl.check`.

Prompt: one system message that lists the question's functions (one JSON line each, in the
format :func:`selftune.agent.prompts.tool_signature` gives the agent's tools) and asks for
``{"tool": "<name>", "arguments": {...}}``, the no-call answer ``{"tool": "none", ...}``, or a
JSON list of calls (in the parallel categories: a JSON list of calls, one per thing asked for);
then BFCL's own messages (a leading BFCL system message is appended to ours). Generation is
greedy with no assistant prefix, so an unconstrained model may answer with a list. With
``constrained=True`` the reply is grammar-constrained to a call of the question's tools or the
no-call answer; in the parallel categories the grammar also admits a JSON list of up to
:data:`PARALLEL_MAX_CALLS` calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from statistics import fmean
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import BaseModel
from tqdm.auto import tqdm

from selftune.agent.constrained import NO_CALL_TOOL
from selftune.agent.generation import generate
from selftune.agent.prompts import tool_signature
from selftune.agent.tool_calls import ToolCallError, parse_tool_calls, without_empty_optionals
from selftune.bfcl.checker import CheckResult, check
from selftune.bfcl.data import BfclAnswer, BfclQuestion, from_tool_name, load_category

__all__ = [
    "BfclRun",
    "CategoryResult",
    "QuestionRecord",
    "build_messages",
    "evaluate_category",
    "score_reply",
    "system_prompt",
]

DEFAULT_MAX_NEW_TOKENS = 256

_INSTRUCTIONS = f"""You are a function-calling assistant. You can call these functions:
{{functions}}

{{reply_format}}
If no function fits the request, reply {{{{"tool": "{NO_CALL_TOOL}", "arguments": {{{{"reason": "..."}}}}}}}}."""
_ONE_CALL = """Reply with one JSON object and nothing else: {"tool": "<name>", "arguments": {...}}.
If the request needs several calls, reply with a JSON list of such objects."""
# Parallel categories: without this, both models write one call where several are asked for.
_SEVERAL_CALLS = """Reply with a JSON list of calls and nothing else: [{"tool": "<name>", "arguments": {...}}, ...].
Make one call for each thing the request asks for."""


class QuestionRecord(BaseModel):
    id: str
    valid: bool
    error: str | None = None
    calls: list[dict[str, Any]] = []  # [{"name": BFCL name, "arguments": {...}}]; no-call answers dropped
    raw: str
    parsed: bool = True
    latency_s: float = 0.0
    output_tokens: int = 0


class CategoryResult(BaseModel):
    category: str
    n: int
    accuracy: float
    parse_rate: float
    mean_latency_s: float
    mean_output_tokens: float
    constrained: bool
    model_id: str | None = None
    adapter_version: str | None = None
    records: list[QuestionRecord]


class BfclRun(BaseModel):
    """One ``selftune eval bfcl`` invocation: its settings and a result per category."""

    model: str
    limit: int | None
    seed: int
    constrained: bool
    results: list[CategoryResult]


def system_prompt(tools: list[dict[str, Any]], several_calls: bool = False) -> str:
    """The instructions with ``tools`` listed; ``several_calls`` asks for a list of calls."""
    return _INSTRUCTIONS.format(
        functions="\n".join(tool_signature(tool) for tool in tools),
        reply_format=_SEVERAL_CALLS if several_calls else _ONE_CALL,
    )


def expects_several_calls(category: str) -> bool:
    """BFCL's parallel categories ask for several calls in one reply."""
    return "parallel" in category


def build_messages(question: BfclQuestion, several_calls: bool = False) -> list[BaseMessage]:
    """Our system message, then BFCL's messages (a leading BFCL system message joins ours)."""
    system = system_prompt(question.tools(), several_calls)
    rest = list(question.messages)
    if rest and rest[0].role == "system":
        system += "\n\n" + rest.pop(0).content
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [SystemMessage(content=system)] + [kinds[m.role](content=m.content) for m in rest]


def score_reply(
    question: BfclQuestion, answer: BfclAnswer | None, text: str
) -> tuple[bool, list[tuple[str, dict[str, Any]]], CheckResult]:
    """Parse ``text`` into calls and score them: ``(parsed, calls, result)``.

    Calls named :data:`NO_CALL_TOOL` are dropped (the no-call answer); the other names are
    mapped back to BFCL's names, and ``null`` for an optional parameter means left out, as
    when the agent makes the call (:func:`without_empty_optionals`). An unparsable reply
    counts as no call (so it can still pass an irrelevance question, as in BFCL) but
    ``parsed`` is False.
    """
    try:
        parsed_calls = parse_tool_calls(text)
        parsed = True
    except ToolCallError:
        parsed_calls, parsed = [], False
    required = {function["name"]: function.get("parameters", {}).get("required", []) for function in question.functions}
    calls = []
    for call in parsed_calls:
        if call.name != NO_CALL_TOOL:
            name = from_tool_name(call.name, question.functions)
            calls.append((name, without_empty_optionals(call.arguments, required.get(name, []))))
    return parsed, calls, check(question, answer, calls)


PARALLEL_MAX_CALLS = 8


def evaluate_category(
    chat: Any,
    category: str,
    limit: int | None = None,
    seed: int = 0,
    constrained: bool = True,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    done: Mapping[str, QuestionRecord] | None = None,
    ids: Collection[str] | None = None,
    exemplars: Callable[[BfclQuestion], list[BaseMessage]] | None = None,
) -> CategoryResult:
    """Run ``chat`` greedily on ``limit`` questions of ``category`` and score them. ``constrained``
    offers the question's functions as tools (grammar on the local backend, native tool calling
    on a server); without it the model sees them only in the prompt. ``done``: records of an
    earlier run with the same settings, by question id; those questions are not asked again,
    their replies are scored again.
    ``ids``: ask exactly these questions of the category (``limit`` and ``seed`` then unused).
    ``exemplars``: example turns to put between the system message and the question."""
    records: list[QuestionRecord] = []
    several_calls = expects_several_calls(category)
    questions = load_category(category, limit=None if ids is not None else limit, seed=seed)
    if ids is not None:
        wanted = set(ids)
        questions = [(question, answer) for question, answer in questions if question.id in wanted]
        if len(questions) != len(wanted):
            raise ValueError(f"{len(wanted) - len(questions)} of the given ids are not in {category}")
    for question, answer in tqdm(questions, desc=category, unit="question", leave=False):
        if done and question.id in done:  # asked before: only scored again, by the current rules
            earlier = done[question.id]
            parsed, calls, result = score_reply(question, answer, earlier.raw)
            records.append(earlier.model_copy(update={
                "valid": result.valid, "error": result.error, "parsed": parsed,
                "calls": [{"name": name, "arguments": arguments} for name, arguments in calls]}))
            continue
        options: dict[str, Any] = {}
        if constrained:
            max_calls = PARALLEL_MAX_CALLS if several_calls else 1
            options.update(tools=question.tools(), allow_no_call=True, max_calls=max_calls)
        start = time.perf_counter()
        messages = build_messages(question, several_calls)
        if exemplars is not None:
            messages = [messages[0], *exemplars(question), *messages[1:]]
        reply = generate(chat, messages, max_tokens=max_new_tokens, temperature=0.0, **options)
        wall = time.perf_counter() - start
        text = reply.content if isinstance(reply.content, str) else str(reply.content)
        parsed, calls, result = score_reply(question, answer, text)
        usage = getattr(reply, "usage_metadata", None) or {}
        records.append(
            QuestionRecord(
                id=question.id,
                valid=result.valid,
                error=result.error,
                calls=[{"name": name, "arguments": arguments} for name, arguments in calls],
                raw=text,
                parsed=parsed,
                latency_s=float(reply.response_metadata.get("latency_s", wall)),
                output_tokens=int(usage.get("output_tokens", 0)),
            )
        )
    n = len(records)
    mean = (lambda values: fmean(values) if values else 0.0)
    return CategoryResult(
        category=category,
        n=n,
        accuracy=mean([float(r.valid) for r in records]),
        parse_rate=mean([float(r.parsed) for r in records]),
        mean_latency_s=mean([r.latency_s for r in records]),
        mean_output_tokens=mean([float(r.output_tokens) for r in records]),
        constrained=constrained,
        model_id=getattr(chat, "model_id", None),
        adapter_version=getattr(chat, "adapter_version", None),
        records=records,
    )
