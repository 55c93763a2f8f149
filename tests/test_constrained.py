"""Grammar-constrained tool calls (xgrammar), with the real SmolLM2-135M.

Schema and grammar checks use only the tokenizer; the generation tests run the
model greedily for a few dozen tokens each.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr
from transformers import LogitsProcessorList

from selftune.agent.constrained import (
    LIST_WHITESPACE,
    NO_CALL_TOOL,
    GrammarCache,
    ToolCallLogitsProcessor,
    _control_in_string,
    _TextState,
    grammar_cache,
    openai_functions,
    tool_call_schema,
)
from selftune.agent.models import load_causal_lm
from selftune.agent.tool_calls import parse_tool_calls
from selftune.agent.transcript import format_tool_call
from selftune.memory.records import ToolCall
from selftune.tools.finish import FinishTool

SMOL = "smollm2-135m-instruct"
PREFIX = '{"tool": "'

BOOK_TRIP = {
    "name": "book_trip",
    "description": "Book a trip for one or more travelers.",
    "parameters": {
        "type": "object",
        "properties": {
            "destination": {"type": "string", "description": "City to travel to."},
            "travel_class": {"type": "string", "enum": ["economy", "business", "first"]},
            "travelers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    },
                    "required": ["name"],
                },
            },
            "dates": {
                "type": "object",
                "properties": {"start": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}},
                "required": ["start", "nights"],
            },
            "notes": {"type": "string"},
            "refundable": {"type": "boolean"},
        },
        "required": ["destination", "dates"],
    },
}
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. '17*23'"}},
            "required": ["expression"],
        },
    },
}
TOOLS = [BOOK_TRIP, CALCULATOR]
# Harder shapes for the scripted-logits runs: $defs, minItems, minLength, free-form
# objects, nullable types, nested arrays and a non-ASCII enum.
ROUTE = {
    "name": "route",
    "parameters": {
        "type": "object",
        "properties": {
            "stops": {"type": "array", "items": {"$ref": "#/$defs/Stop"}, "minItems": 2},
            "mode": {"enum": ["car", "bike", "Zürich-Bahn"]},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["stops", "mode"],
        "$defs": {
            "Stop": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "lat": {"type": "number"}},
                "required": ["name", "lat"],
            }
        },
    },
}
SEARCH = {
    "name": "search",
    "parameters": {
        "type": "object",
        "properties": {
            "q": {"type": "string", "minLength": 1},
            "filters": {"type": "object", "additionalProperties": {"type": "string"}},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": ["integer", "null"]}}},
            "exact": {"type": "boolean"},
        },
        "required": ["q", "exact"],
    },
}


def _accepts(grammar: xgr.CompiledGrammar, text: str) -> bool:
    matcher = xgr.GrammarMatcher(grammar)
    return matcher.accept_string(text) and matcher.is_completed()


@pytest.fixture(scope="module")
def smol(model_cache: Path) -> tuple[Any, Any]:
    return load_causal_lm(SMOL, model_cache)


@pytest.fixture(scope="module")
def tokenizer(smol: tuple[Any, Any]) -> Any:
    return smol[1]


@pytest.fixture(scope="module")
def cache(smol: tuple[Any, Any]) -> GrammarCache:
    model, tokenizer = smol
    return GrammarCache(tokenizer, vocab_size=model.config.vocab_size)


# --- schema ---------------------------------------------------------------------------------


def test_schema_branch_per_tool_with_bounds() -> None:
    schema = tool_call_schema(TOOLS, allow_no_call=False)
    branches = schema["anyOf"]
    assert [b["properties"]["tool"] for b in branches] == [{"const": "book_trip"}, {"const": "calculator"}]
    arguments = branches[0]["properties"]["arguments"]
    assert arguments["additionalProperties"] is False
    assert arguments["required"] == ["destination", "dates"]
    props = arguments["properties"]
    assert props["destination"] == {"type": "string", "maxLength": 200}  # description dropped, bound added
    assert props["travel_class"] == {"anyOf": [{"type": "string", "enum": ["economy", "business", "first"]},
                                               {"type": "null"}]}  # optional: may be left empty
    jsonschema.validate({"tool": "book_trip", "arguments": {"destination": "Oslo", "dates": {"start": "x", "nights": 2},
                                                            "travel_class": None}}, schema)
    with pytest.raises(jsonschema.ValidationError):  # required parameters never take null
        jsonschema.validate({"tool": "book_trip", "arguments": {"destination": None, "dates": {"start": "x", "nights": 2}}},
                            schema)
    travelers = props["travelers"]["anyOf"][0]
    assert travelers["maxItems"] == 32 and travelers["items"]["properties"]["name"]["maxLength"] == 200
    assert props["dates"]["properties"]["nights"] == {"type": "integer", "minimum": 1, "maximum": 10**15 - 1}
    assert props["dates"]["additionalProperties"] is False
    small = tool_call_schema(TOOLS, max_string_length=50, max_items=3)["anyOf"][0]["properties"]["arguments"]
    assert small["properties"]["destination"]["maxLength"] == 50
    assert small["properties"]["travelers"]["anyOf"][0]["maxItems"] == 3


def test_schema_no_call_array_and_errors() -> None:
    single = tool_call_schema([CALCULATOR], allow_no_call=True)
    assert [b["properties"]["tool"]["const"] for b in single["anyOf"]] == ["calculator", NO_CALL_TOOL]
    assert single["anyOf"][1]["properties"]["arguments"]["required"] == ["reason"]
    assert tool_call_schema([CALCULATOR])["properties"]["tool"] == {"const": "calculator"}  # one tool: no anyOf
    multi = tool_call_schema(TOOLS, allow_no_call=True, max_calls=3)
    one, array = multi["anyOf"]
    assert array["type"] == "array" and (array["minItems"], array["maxItems"]) == (1, 3)
    assert NO_CALL_TOOL not in json.dumps(array)  # the no-call answer is never an array item
    assert len(one["anyOf"]) == 3
    with pytest.raises(ValueError, match="duplicate"):
        tool_call_schema([CALCULATOR, CALCULATOR])
    with pytest.raises(ValueError, match="reserved"):
        tool_call_schema([{"name": NO_CALL_TOOL, "parameters": {}}], allow_no_call=True)
    with pytest.raises(ValueError, match="no tools"):
        tool_call_schema([])
    assert tool_call_schema([], allow_no_call=True)["properties"]["tool"] == {"const": NO_CALL_TOOL}


def test_schema_refs_are_renamed_per_tool() -> None:
    tools = [
        {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "required": ["item"],
                "$defs": {"Item": {"type": "object", "properties": {"v": {"type": kind}}, "required": ["v"]}},
            },
        }
        for name, kind in (("a", "string"), ("b", "integer"))
    ]
    schema = tool_call_schema(tools)
    assert set(schema["$defs"]) == {"t0_Item", "t1_Item"}
    refs = [b["properties"]["arguments"]["properties"]["item"]["$ref"] for b in schema["anyOf"]]
    assert refs == ["#/$defs/t0_Item", "#/$defs/t1_Item"]
    jsonschema.validate({"tool": "b", "arguments": {"item": {"v": 3}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool": "b", "arguments": {"item": {"v": "x"}}}, schema)


# --- grammar ----------------------------------------------------------------------------------


def test_grammar_matches_format_tool_call(cache: GrammarCache) -> None:
    grammar = cache.compile_tools(TOOLS).compiled
    arguments = {
        "destination": "Zürich",
        "travel_class": "first",
        "travelers": [{"name": "Ana \"A\"", "age": 34}, {"name": "Ben"}],
        "dates": {"start": "2025-05-01", "nights": 3},
        "notes": "window seat\nno nuts",
        "refundable": True,
    }
    canonical = format_tool_call(ToolCall(name="book_trip", arguments=arguments))
    assert _accepts(grammar, canonical)  # same separators, escapes and raw UTF-8 allowed
    assert _accepts(grammar, format_tool_call(ToolCall(name="calculator", arguments={"expression": "17*23"})))
    assert not _accepts(grammar, json.dumps({"tool": "calculator", "arguments": {"expression": "1"}}, indent=1))
    assert not _accepts(grammar, '{"tool":"calculator","arguments":{"expression":"1"}}')


def test_grammar_keys_types_and_optional_keys(cache: GrammarCache) -> None:
    grammar = cache.compile_tools(TOOLS).compiled
    minimal = {"tool": "book_trip", "arguments": {"destination": "Rome", "dates": {"start": "x", "nights": 1}}}
    assert _accepts(grammar, format_tool_call(ToolCall(name="book_trip", arguments=minimal["arguments"])))
    bad = [
        {"destination": "Rome"},  # required dates missing
        {"destination": "Rome", "dates": {"start": "x", "nights": 1}, "extra": 1},  # undeclared key
        {"destination": "Rome", "travel_class": "coach", "dates": {"start": "x", "nights": 1}},  # not in enum
        {"destination": "Rome", "dates": {"start": "x", "nights": 0}},  # below minimum
        {"destination": "Rome", "dates": {"start": "x", "nights": "1"}},  # wrong type
    ]
    for arguments in bad:
        assert not _accepts(grammar, format_tool_call(ToolCall(name="book_trip", arguments=arguments))), arguments
    assert not _accepts(grammar, format_tool_call(ToolCall(name="weather", arguments={})))


def test_grammar_bounds_strings_and_arrays(cache: GrammarCache) -> None:
    tool = {"name": "t", "parameters": {"type": "object", "properties": {
        "short": {"type": "string", "maxLength": 3},
        "list": {"type": "array", "items": {"type": "integer"}},
    }}}
    grammar = cache.compile_tools([tool], max_items=2).compiled
    assert _accepts(grammar, '{"tool": "t", "arguments": {"short": "abc", "list": [1, 2]}}')
    assert not _accepts(grammar, '{"tool": "t", "arguments": {"short": "abcd"}}')  # declared maxLength: grammar
    assert not _accepts(grammar, '{"tool": "t", "arguments": {"list": [1, 2, 3]}}')  # maxItems
    assert not _accepts(grammar, '{"tool": "t", "arguments": {"list": [10000000000000000]}}')  # |n| < 10**15


def test_no_call_and_array_mode(cache: GrammarCache) -> None:
    none = '{"tool": "none", "arguments": {"reason": "no tool fits"}}'
    calc = format_tool_call(ToolCall(name="calculator", arguments={"expression": "1+1"}))
    assert _accepts(cache.compile_tools(TOOLS, allow_no_call=True).compiled, none)
    assert not _accepts(cache.compile_tools(TOOLS).compiled, none)
    multi = cache.compile_tools(TOOLS, allow_no_call=True, max_calls=2).compiled
    assert _accepts(multi, f"[{calc}, {calc}]")
    assert _accepts(multi, f"[{calc}]") and _accepts(multi, calc) and _accepts(multi, none)
    assert not _accepts(multi, f"[{calc}, {calc}, {calc}]")
    assert not _accepts(multi, "[]") and not _accepts(multi, f"[{none}]")
    assert [c.name for c in parse_tool_calls(f"[{calc}, {calc}]")] == ["calculator", "calculator"]


def test_compiled_grammars_are_cached_per_tool_set(tokenizer: Any) -> None:
    cache = GrammarCache(tokenizer, max_entries=2)
    first = cache.compile_tools(TOOLS)
    assert (cache.compiles, cache.hits) == (1, 0)
    assert cache.compile_tools([dict(t) for t in TOOLS]) is first  # equal tool set: a hit
    assert (cache.compiles, cache.hits) == (1, 1)
    cache.processor(TOOLS, max_new_tokens=8)
    assert (cache.compiles, cache.hits) == (1, 2)
    cache.compile_tools(TOOLS, allow_no_call=True)
    cache.compile_tools([CALCULATOR])
    assert cache.compiles == 3 and len(cache) == 2  # LRU: the first one was evicted
    cache.compile_tools(TOOLS)
    assert cache.compiles == 4
    assert cache.compile_seconds > 0
    assert grammar_cache(tokenizer) is grammar_cache(tokenizer)


def test_langchain_tools_are_converted(cache: GrammarCache) -> None:
    functions = openai_functions([FinishTool(), CALCULATOR])
    assert functions[0]["name"] == "finish" and functions[1] is CALCULATOR["function"]  # OpenAI tools unwrapped
    grammar = cache.compile_tools(functions).compiled
    assert _accepts(grammar, format_tool_call(ToolCall(name="finish", arguments={"answer": "391"})))


def test_prefix_must_fit_the_grammar(cache: GrammarCache) -> None:
    cache.processor(TOOLS, max_new_tokens=8, prefix=PREFIX)
    with pytest.raises(ValueError, match="prefix"):
        cache.processor(TOOLS, max_new_tokens=8, prefix='{"name": "')


# --- the processor with scripted logits -----------------------------------------------------------


def _drive(
    processor: ToolCallLogitsProcessor,
    logits: Callable[[int], torch.Tensor],
    max_new_tokens: int,
    eos: int,
    batch: int = 1,
) -> list[list[int]]:
    """``generate``'s greedy loop with ``logits(step)`` (batch x vocab) in place of a model."""
    sequences = torch.full((batch, 3), 7, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        scores = processor(sequences, logits(step).clone())
        chosen = torch.where(done, torch.full_like(done, eos, dtype=torch.long), scores.argmax(-1))
        sequences = torch.cat([sequences, chosen[:, None]], dim=1)
        done |= chosen == eos
        if done.all():
            break
    return [[t for t in row[3:].tolist()] for row in sequences]


def test_a_list_of_calls_may_be_laid_out_over_lines_but_strings_hold_no_newline(cache: GrammarCache) -> None:
    """Models write one call per line in a list; without newlines the only separator left after
    the first call is ``, {`` and they close the list instead (BFCL parallel: 2 -> 8 of 12)."""
    laid_out = '[\n  {"tool": "calculator", "arguments": {"expression": "1+1"}},\n  ' \
               '{"tool": "calculator", "arguments": {"expression": "2*3"}}\n]'
    several, single = cache.compile_tools([CALCULATOR], max_calls=3), cache.compile_tools([CALCULATOR])
    assert several.whitespace == LIST_WHITESPACE and single.whitespace == 0
    assert _accepts(several.compiled, laid_out)
    assert not xgr.GrammarMatcher(single.compiled).accept_string('{\n"tool"')  # one call stays compact
    jsonschema.validate(json.loads(laid_out), several.schema)

    vocab = cache.vocab
    newline, bracket, quote = (vocab.lookup[b] for b in (b"\n", b"[", b'"'))
    processor = ToolCallLogitsProcessor(several, cache, max_new_tokens=None, stop_token_ids=0)
    sequence = torch.zeros(1, 1, dtype=torch.long)
    text = b'[{"tool": "calculator", "arguments": {"expression": "'
    for step, token in enumerate([bracket, *(vocab.lookup[bytes([b])] for b in text[1:])]):
        scores = processor(sequence, torch.zeros(1, vocab.size))
        if step == 1:  # after "[": a newline may come next
            assert torch.isfinite(scores[0, newline])
        assert torch.isfinite(scores[0, token]), (step, vocab.tokens[token])
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    scores = processor(sequence, torch.zeros(1, vocab.size))
    assert processor.rows[0].text.in_string and not torch.isfinite(scores[0, newline])  # inside the string
    assert torch.isfinite(scores[0, quote])


def test_a_token_that_closes_the_string_before_its_newline_is_admitted(cache: GrammarCache) -> None:
    """Qwen writes ``"}},\n`` and ``"}}\n`` as one token each; banning every newline token while a
    string was open made it continue the list instead of closing it (BFCL parallel_186: 7 calls)."""
    assert not _control_in_string(b'"}},\n', _TextState(in_string=True))
    assert not _control_in_string(b'"}}\n', _TextState(in_string=True))
    assert _control_in_string(b"ab\n", _TextState(in_string=True))
    assert _control_in_string(b'"\n', _TextState(in_string=True, escape=True))  # an escaped quote: still open
    assert _control_in_string(b': "\n', _TextState())  # opens a string, then the newline
    assert not _control_in_string(b"}\n", _TextState())
    layout_inside = {int(i) for i in cache.vocab.strung[(True, False)]}
    assert cache.vocab.lookup[b"\n"] in layout_inside and layout_inside <= cache.vocab.layout


def _text(tokenizer: Any, processor: ToolCallLogitsProcessor, tokens: list[int], row: int = 0) -> tuple[str, str]:
    """The full reply and the completion the processor had to add."""
    completion = processor.completion(tokens, row)
    return processor.prefix + tokenizer.decode(tokens, skip_special_tokens=True) + completion, completion


def _noise(step: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(step))


def test_looping_model_is_bounded_and_closed(cache: GrammarCache, tokenizer: Any) -> None:
    """A model that only ever wants to write 'a' and escaped quotes inside a string."""
    vocab = cache.vocab
    eos = tokenizer.eos_token_id
    a, escaped_quote = vocab.lookup[b"a"], vocab.lookup[b'\\"']

    def logits(step: int) -> torch.Tensor:
        row = _noise(step, vocab.size)
        row[a] += 50.0
        row[escaped_quote] += 49.0 if step % 2 else 51.0
        return row[None]

    for budget in (160, 30, 6):
        processor = cache.processor(
            [CALCULATOR], max_new_tokens=budget, prefix=PREFIX, stop_token_ids=eos, max_string_length=40
        )
        tokens = _drive(processor, logits, budget, eos)[0]
        assert len(tokens) <= budget
        text, completion = _text(tokenizer, processor, tokens)
        value = json.loads(text)
        jsonschema.validate(value, processor.grammar.schema)
        expression = value["arguments"]["expression"]
        assert len(expression) <= 40
        if budget == 160:
            assert '"' in expression and len(json.dumps(expression)) - 2 <= 40  # escapes count, bound holds
            assert tokens[-1] == eos  # closed and stopped well within the budget
        if budget == 30:
            assert completion == ""  # the guard closed it in time
        if budget == 6:
            assert completion  # too small for any call: the completion finishes it


def test_batch_rows_are_independent(cache: GrammarCache, tokenizer: Any) -> None:
    eos = tokenizer.eos_token_id
    processor = cache.processor(TOOLS, max_new_tokens=48, stop_token_ids=eos, allow_no_call=True)
    rows = _drive(processor, lambda step: _noise(step, 2, cache.vocab.size), 48, eos, batch=2)
    texts = [_text(tokenizer, processor, tokens, row)[0] for row, tokens in enumerate(rows)]
    assert texts[0] != texts[1]
    for text in texts:
        jsonschema.validate(json.loads(text), processor.grammar.schema)


def test_random_logits_always_give_valid_calls(cache: GrammarCache, tokenizer: Any) -> None:
    """Scripted noisy "models" over several tool sets and budgets: every reply validates.

    The noise favours structural tokens (quotes, braces, escapes, UTF-8 bytes) to push
    the grammar into awkward states; half the runs sample, half are greedy. Greedy runs
    whose budget covers the shortest call must not need the completion.
    """
    vocab, eos = cache.vocab, tokenizer.eos_token_id
    favourites = [vocab.lookup[b] for b in (b'"', b"}", b"]", b"a", b"\\", b'\\"', b"{", b",", b"0", b"\xc3")]
    tool_sets = [TOOLS, [ROUTE], [SEARCH], [ROUTE, SEARCH, CALCULATOR]]
    for trial in range(24):
        generator = torch.Generator().manual_seed(trial)
        tools = tool_sets[trial % len(tool_sets)]
        budget = [2, 5, 9, 16, 30, 60][trial % 6]
        greedy = trial % 2 == 0
        processor = cache.processor(
            tools, max_new_tokens=budget, stop_token_ids=eos, allow_no_call=trial % 3 == 0,
            max_calls=1 + trial % 3, prefix=PREFIX if trial % 4 == 1 else "", max_string_length=40,
        )
        bias = torch.zeros(vocab.size)
        bias[favourites] = torch.rand(len(favourites), generator=generator) * 20
        sequence = torch.zeros(1, 3, dtype=torch.long)
        need = None
        for step in range(budget):
            scores = processor(sequence, torch.randn(1, vocab.size, generator=generator) * 3 + bias)
            need = processor.rows[0].need if step == 0 else need
            if greedy:
                token = int(scores.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(scores[0], -1), 1, generator=generator))
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            if token == eos:
                break
        text, completion = _text(tokenizer, processor, sequence[0, 3:].tolist())
        jsonschema.validate(json.loads(text), processor.grammar.schema)
        if greedy and need is not None and budget >= need:
            assert completion == "", (trial, text)


# --- real generation ----------------------------------------------------------------------------


def _generate(
    smol: tuple[Any, Any],
    cache: GrammarCache | None,
    prompt: str,
    max_new_tokens: int,
    prefix: str = "",
    **options: Any,
) -> tuple[str, ToolCallLogitsProcessor | None, int, float, str]:
    """Greedy reply (prefix included, completion appended), processor, new tokens, seconds, completion."""
    model, tokenizer = smol
    system = "You are an agent. Reply with exactly one JSON tool call.\nTools:\n" + "\n".join(
        json.dumps(t.get("function", t)) for t in TOOLS
    )
    chat = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + prefix
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = None
    if cache is not None:
        processor = cache.processor(
            TOOLS, max_new_tokens=max_new_tokens, prefix=prefix,
            stop_token_ids=model.generation_config.eos_token_id, **options,
        )
        kwargs["logits_processor"] = LogitsProcessorList([processor])
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**encoded, **kwargs)
    seconds = time.perf_counter() - start
    new_tokens = output[0, encoded["input_ids"].shape[1]:]
    completion = processor.completion(new_tokens) if processor is not None else ""
    reply = prefix + tokenizer.decode(new_tokens, skip_special_tokens=True) + completion
    return reply, processor, int(new_tokens.shape[0]), seconds, completion


PROMPTS = [
    "Book a business class trip to Rome for Ana (34) and Ben, starting 2025-05-01, for 3 nights.",
    "I need a refundable trip to Oslo from June 2 for two nights.",
    "What is 17*23?",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_constrained_replies_parse_and_validate(smol: tuple[Any, Any], cache: GrammarCache, prompt: str) -> None:
    reply, processor, n, _, completion = _generate(smol, cache, prompt, max_new_tokens=40, prefix=PREFIX)
    assert processor is not None and n <= 40
    value = json.loads(reply)
    jsonschema.validate(value, processor.grammar.schema)
    assert completion == ""  # the guard closed the reply within the budget
    calls = parse_tool_calls(reply)
    assert len(calls) == 1 and calls[0].name in {"book_trip", "calculator"}


@pytest.mark.parametrize("max_new_tokens", [12, 3])
def test_tiny_budget_still_parses(smol: tuple[Any, Any], cache: GrammarCache, max_new_tokens: int) -> None:
    reply, processor, n, _, _ = _generate(smol, cache, PROMPTS[0], max_new_tokens=max_new_tokens)
    assert processor is not None and n <= max_new_tokens
    jsonschema.validate(json.loads(reply), processor.grammar.schema)


def test_no_call_branch_in_generation(smol: tuple[Any, Any], cache: GrammarCache) -> None:
    prefix = '{"tool": "none", "arguments": {"reason": "'
    reply, processor, _, _, _ = _generate(
        smol, cache, "Tell me a joke; none of the tools fits.", 24, prefix=prefix, allow_no_call=True
    )
    assert processor is not None
    value = json.loads(reply)
    jsonschema.validate(value, processor.grammar.schema)
    assert value["tool"] == NO_CALL_TOOL and isinstance(value["arguments"]["reason"], str)


def test_mask_overhead_per_token(smol: tuple[Any, Any], cache: GrammarCache) -> None:
    """Masked vs unmasked greedy generation of the same prompt (timings printed; run with -s)."""
    prompt = PROMPTS[0]
    cache.compile_tools(TOOLS)  # compile outside the timing
    _, processor, masked_n, masked_s, _ = _generate(smol, cache, prompt, max_new_tokens=24, prefix=PREFIX)
    _, _, plain_n, plain_s, _ = _generate(smol, None, prompt, max_new_tokens=24, prefix=PREFIX)
    assert processor is not None and processor.steps > 0
    per_step_ms = processor.mask_seconds / processor.steps * 1e3
    print(
        f"\nmasked {masked_n} tokens {masked_s / masked_n * 1e3:.1f} ms/token, "
        f"unmasked {plain_n} tokens {plain_s / plain_n * 1e3:.1f} ms/token, "
        f"processor {per_step_ms:.2f} ms/step, forced {processor.forced_tokens}"
    )
    assert per_step_ms < 50  # ~0.5 ms on an idle core; generous for shared CI machines


def _scripted_choice(cache: GrammarCache, tokenizer: Any, tools: list[dict[str, Any]], bias: float,
                     favourites: dict[str, float]) -> str:
    """The tool a greedy reply picks when ``favourites`` (token text -> score) lead and the rest is flat."""
    processor = cache.processor(tools, max_new_tokens=40, prefix=PREFIX, allow_no_call=True, no_call_bias=bias,
                                stop_token_ids=tokenizer.eos_token_id)
    scores = torch.zeros(1, cache.vocab.size)
    for text, value in favourites.items():
        scores[0, cache.vocab.lookup[text.encode()]] = value
    tokens = _drive(processor, lambda step: scores, 40, tokenizer.eos_token_id)[0]
    return json.loads(PREFIX + tokenizer.decode(tokens, skip_special_tokens=True) + processor.completion(tokens))["tool"]


def test_no_call_bias_moves_the_choice_between_a_tool_and_no_call(cache: GrammarCache, tokenizer: Any) -> None:
    favourites = {"none": 1.0, "calcul": 2.0}  # the tool leads the no-call answer by 1 nat
    assert _scripted_choice(cache, tokenizer, TOOLS, 0.0, favourites) == "calculator"
    assert _scripted_choice(cache, tokenizer, TOOLS, 0.5, favourites) == "calculator"
    assert _scripted_choice(cache, tokenizer, TOOLS, 1.5, favourites) == NO_CALL_TOOL
    assert _scripted_choice(cache, tokenizer, TOOLS, -5.0, {"none": 3.0, "calcul": 2.0}) == "calculator"


def test_no_call_bias_needs_the_no_call_answer_offered(cache: GrammarCache) -> None:
    processor = cache.processor(TOOLS, max_new_tokens=8, prefix=PREFIX, allow_no_call=False, no_call_bias=3.0)
    assert processor.no_call_bias == 0.0


def test_no_call_bias_leaves_tokens_shared_with_a_tool_name_alone(cache: GrammarCache) -> None:
    """A tool named ``nonstop_flight`` shares ``n``/``no``/``non`` with ``none``: those stay unbiased."""
    nonstop = {"name": "nonstop_flight", "description": "Book a nonstop flight.",
               "parameters": {"type": "object", "properties": {}}}
    processor = cache.processor([nonstop, CALCULATOR], max_new_tokens=8, prefix=PREFIX, allow_no_call=True,
                                no_call_bias=1.0)
    chosen = set(processor._no_call_choice(PREFIX.encode()).tolist())
    lookup = cache.vocab.lookup
    assert lookup[b"none"] in chosen
    assert chosen.isdisjoint(lookup[text] for text in (b"n", b"no", b"non") if text in lookup)
    # Before the opening is complete a token must still reach into the name: ' "none' does, ' "' does not.
    partial = set(processor._no_call_choice(b'{"tool":').tolist())
    assert lookup.get(b' "') not in partial
