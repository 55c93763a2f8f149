"""Grammar-constrained tool calls: the model can only write a valid call of an offered tool.

Three pieces, all built on xgrammar's JSON-schema grammars:

* :func:`tool_call_schema` turns OpenAI-style function descriptions into one JSON
  Schema for the whole reply, ``{"tool": "<name>", "arguments": {...}}``, with
  ``tool`` a constant per branch and ``arguments`` that tool's parameters;
  optionally a declared "no tool" answer (:data:`NO_CALL_TOOL`) and a JSON array
  of up to ``max_calls`` calls. Every string gets a ``maxLength`` and every array
  a ``maxItems``, so a small model cannot loop inside a value.
* :class:`GrammarCache` compiles such schemas for one tokenizer, once per tool set
  (an LRU keyed by the schema's hash). :func:`grammar_cache` shares one cache per
  tokenizer.
* :class:`ToolCallLogitsProcessor`, a transformers ``LogitsProcessor`` for
  ``model.generate(logits_processor=...)``: it masks every token the grammar
  forbids, forces EOS once the call is complete, and keeps the reply closable
  within ``max_new_tokens`` (see *Budget* below). :meth:`ToolCallLogitsProcessor.completion`
  returns the text that completes a reply that was cut short anyway.

Output format. The grammar is compact JSON with the separators ``", "`` and
``": "`` and properties in schema order, i.e. ``{"tool": "x", "arguments": {"a": 1}}``:
byte for byte what ``selftune.agent.transcript.format_tool_call`` writes for calls
whose arguments follow the declared property order.

Strings. xgrammar's ``maxLength`` strings admit no escape sequences (no ``\\n``,
``\\"``), which would make code or multi-line text impossible. Strings bounded at
the configured ``max_string_length`` therefore stay ordinary JSON strings in the
grammar and the processor enforces the bound at run time, counting the encoded
bytes of the open string (conservative: an escape or a multi-byte character counts
more than one). Only a smaller ``maxLength`` declared by a tool itself (or a
``max_string_length`` under 32) is left to the grammar, and such strings cannot
contain escapes. Tokens with raw control bytes are never admitted.

Budget. With ``max_new_tokens`` known, the processor keeps an estimate of how many
tokens closing the partial reply takes: a shortest-first search over the matcher
(close the open string, close containers as soon as the grammar allows, fill
missing required keys with minimal values), spelled out in tokens. Far from the
end of the budget it does nothing more. Within ``guard_window`` tokens of it, each
step checks the best-scoring tokens and bans those after which the reply could no
longer be closed in the tokens left, and when none is safe it forces the closing
tokens. Greedy decoding therefore ends with a complete reply whenever the budget
allows the shortest call at all. When it does not (or sampling drew an unchecked
token, or generation stopped for another reason), :meth:`ToolCallLogitsProcessor.completion`
returns the missing text; appending it always yields JSON the schema accepts.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import itertools
import json
import logging
import re
import string
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xgrammar as xgr
from transformers import LogitsProcessor

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_STRING_LENGTH",
    "JSON_CALL_PREFIX",
    "LIST_WHITESPACE",
    "NO_CALL_TOOL",
    "GrammarCache",
    "ToolCallLogitsProcessor",
    "ToolGrammar",
    "grammar_cache",
    "openai_functions",
    "tool_call_schema",
]

log = logging.getLogger(__name__)

NO_CALL_TOOL = "none"
"""Tool name of the declared "no tool" answer: ``{"tool": "none", "arguments": {"reason": "..."}}``."""

JSON_CALL_PREFIX = '{"tool": "'
"""How every single-call reply opens: next comes the tool name, where the reply chooses between the
offered tools and the no-call answer (``no_call_bias``)."""
_CALL_OPENING = JSON_CALL_PREFIX.encode()

DEFAULT_MAX_STRING_LENGTH = 200
DEFAULT_MAX_ITEMS = 32  # longest list in any BFCL gold answer: 20 items
# Whitespace run (newline and indent) admitted between tokens of a reply that may list several calls.
# Models write such lists one call per line; a compact-only grammar leaves them no separator but
# ``, {`` after the first call, and most close the list there instead (measured on BFCL parallel).
LIST_WHITESPACE = 8
# Integers without bounds get +-(10**15 - 1): an unbounded digit run is another loop.
_INTEGER_LIMIT = 10**15 - 1
# Far from the end of the budget, the guard re-estimates the closing cost every this many steps.
_GUARD_RECHECK = 8
# Below this the run-time string bound is not used (a token can be longer than the room left).
_MIN_RUNTIME_STRING_CAP = 32

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly", "$schema", "$id"}
)
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_KEYS = ("items", "not", "additionalItems", "contains", "if", "then", "else", "unevaluatedItems")


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


def openai_functions(tools: Iterable[Any]) -> list[dict[str, Any]]:
    """Function descriptions (``{"name", "description", "parameters"}``) of LangChain tools and of
    dicts (bare function descriptions or OpenAI tools)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [_function(tool) if isinstance(tool, dict) else convert_to_openai_tool(tool)["function"] for tool in tools]


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    """The function description in an OpenAI tool (``{"type": "function", "function": {...}}``) or a bare one."""
    if "function" in tool and isinstance(tool["function"], dict):
        tool = tool["function"]
    if not isinstance(tool.get("name"), str) or not tool["name"]:
        raise ValueError(f"tool description without a name: {tool!r}")
    return tool


def _types(schema: dict[str, Any]) -> set[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {k for k in kind if isinstance(k, str)}
    if "properties" in schema:
        return {"object"}
    return set()


class _Bounder:
    """Copies a tool's parameter schema with bounds added and ``$ref`` names made unique."""

    def __init__(self, prefix: str, defs: dict[str, Any], max_string_length: int, max_items: int) -> None:
        self.prefix, self.defs = prefix, defs
        self.max_string_length, self.max_items = max_string_length, max_items

    def ref(self, ref: str) -> str:
        for head in ("#/$defs/", "#/definitions/"):
            if ref.startswith(head):
                return f"#/$defs/{self.prefix}{ref[len(head):]}"
        raise ValueError(f"unsupported $ref {ref!r}: only local #/$defs/... references are supported")

    def __call__(self, schema: Any) -> Any:
        if schema is True:
            return {}
        if not isinstance(schema, dict):
            return schema  # False or malformed: leave it to xgrammar
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key in _ANNOTATIONS:
                continue
            if key in ("$defs", "definitions"):
                for name, sub in value.items():
                    self.defs[f"{self.prefix}{name}"] = self(sub)
            elif key == "$ref":
                out[key] = self.ref(value)
            elif key in ("properties", "patternProperties"):
                out[key] = {name: self(sub) for name, sub in value.items()}
            elif key in _SUBSCHEMA_LISTS:
                out[key] = [self(sub) for sub in value]
            elif key in _SUBSCHEMA_KEYS or key == "additionalProperties":
                out[key] = self(value) if isinstance(value, dict) else value
            else:
                out[key] = copy.deepcopy(value)
        if "oneOf" in out and "anyOf" not in out:
            # Branches of a tool schema hardly ever overlap; anyOf is what the grammar does anyway.
            out["anyOf"] = out.pop("oneOf")
        types = _types(out)
        constant = "enum" in out or "const" in out
        if "string" in types and not constant and "format" not in out:
            out["maxLength"] = min(int(out.get("maxLength", self.max_string_length)), self.max_string_length)
            if out["maxLength"] < int(out.get("minLength", 0)):
                raise ValueError(f"minLength {out['minLength']} exceeds the string bound {self.max_string_length}")
        if "array" in types and not constant:
            low = int(out.get("minItems", 0))
            out["maxItems"] = max(min(int(out.get("maxItems", self.max_items)), self.max_items), low)
        if "integer" in types and not constant:
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = -_INTEGER_LIMIT
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = _INTEGER_LIMIT
        if "object" in types and not constant:
            if "properties" in out:  # declared keys only (``properties: {}`` takes ``{}``)
                out.setdefault("additionalProperties", False)
                if "required" in out:
                    out["required"] = [name for name in out["required"] if name in out["properties"]]
            elif out.get("additionalProperties", True) is not False:  # a free-form mapping
                out["maxProperties"] = min(int(out.get("maxProperties", self.max_items)), self.max_items)
        return out


def _admits_null(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True  # ``{}``-like or malformed: left to xgrammar
    return "null" in _types(schema) or any(_admits_null(sub) for sub in schema.get("anyOf", []))


def _arguments_schema(parameters: Any, bounder: _Bounder) -> dict[str, Any]:
    """A tool's bounded parameter schema; its optional parameters also admit ``null`` (left empty)."""
    if not parameters:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    schema = bounder(parameters)
    schema.setdefault("type", "object")
    required = set(schema.get("required", []))
    properties = schema.get("properties")
    if isinstance(properties, dict):
        schema["properties"] = {
            name: sub if name in required or _admits_null(sub) else {"anyOf": [sub, {"type": "null"}]}
            for name, sub in properties.items()
        }
    return schema


def _call_branch(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"tool": {"const": name}, "arguments": arguments},
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def _one_of(branches: list[dict[str, Any]]) -> dict[str, Any]:
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tool_call_schema(
    tools: Sequence[dict[str, Any]],
    allow_no_call: bool = False,
    max_calls: int = 1,
    *,
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> dict[str, Any]:
    """JSON Schema of a reply that calls one of ``tools``.

    ``tools``: OpenAI-style function descriptions ``{"name", "description", "parameters"}``
    (or ``{"type": "function", "function": {...}}``, as ``convert_to_openai_tool`` returns).
    A call is ``{"tool": <name>, "arguments": <that tool's parameters>}``; arguments
    admit no undeclared keys, and optional keys may be left out or be ``null`` (a model
    that means to leave a parameter empty often writes ``null``; without it the grammar
    would force a made-up value). Local ``$defs``
    references are kept (renamed per tool); descriptions and defaults are dropped.

    ``allow_no_call`` adds ``{"tool": "none", "arguments": {"reason": <string>}}`` (see
    :data:`NO_CALL_TOOL`). With ``max_calls > 1`` the reply may also be a JSON array of
    1..``max_calls`` calls (the no-call answer stays a single object, never an array item).

    Bounds against loops: strings ``maxLength <= max_string_length``, arrays
    ``maxItems <= max_items`` (free-form objects ``maxProperties <= max_items``),
    unbounded integers ``|n| < 10**15``. Numbers and ``pattern``/``format`` strings
    keep their declared form (the processor's budget guard still ends them).
    """
    if max_calls < 1:
        raise ValueError("max_calls must be at least 1")
    if max_string_length < 1 or max_items < 1:
        raise ValueError("max_string_length and max_items must be positive")
    functions = [_function(tool) for tool in tools]
    names = [function["name"] for function in functions]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tool names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if allow_no_call and NO_CALL_TOOL in names:
        raise ValueError(f"a tool is named {NO_CALL_TOOL!r}, the reserved no-call answer")
    if not functions and not allow_no_call:
        raise ValueError("no tools to call and allow_no_call is False")

    defs: dict[str, Any] = {}
    calls = []
    for index, function in enumerate(functions):
        bounder = _Bounder(f"t{index}_", defs, max_string_length, max_items)
        calls.append(_call_branch(function["name"], _arguments_schema(function.get("parameters"), bounder)))
    no_call = _call_branch(
        NO_CALL_TOOL,
        {
            "type": "object",
            "properties": {"reason": {"type": "string", "maxLength": max_string_length}},
            "required": ["reason"],
            "additionalProperties": False,
        },
    )
    single = _one_of(calls + [no_call] if allow_no_call else calls)
    if max_calls > 1 and calls:
        array = {"type": "array", "items": _one_of(calls), "minItems": 1, "maxItems": max_calls}
        schema: dict[str, Any] = {"anyOf": [single, array]}
    else:
        schema = single
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def _grammar_schema(schema: Any, cap: int) -> Any:
    """``schema`` without the string ``maxLength`` bounds of ``cap`` or more (enforced at run time instead)."""
    if isinstance(schema, list):
        return [_grammar_schema(item, cap) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("enum", "const"):
            out[key] = value
        elif key == "maxLength" and isinstance(value, int) and value >= cap and "pattern" not in schema:
            continue
        elif key in ("properties", "patternProperties", "$defs", "definitions"):
            out[key] = {name: _grammar_schema(sub, cap) for name, sub in value.items()}
        else:
            out[key] = _grammar_schema(value, cap)
    return out


# --------------------------------------------------------------------------------------
# Compiled grammars
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolGrammar:
    """A compiled reply grammar: the validation ``schema``, and ``string_cap``, the run-time
    bound in bytes on every JSON string (None: strings are bounded by the grammar only)."""

    compiled: xgr.CompiledGrammar
    schema: dict[str, Any]
    string_cap: int | None
    key: str
    whitespace: int = 0  # longest whitespace run admitted between tokens (0: compact JSON)


class _Vocab:
    """Per-tokenizer token tables used by the processor."""

    def __init__(self, info: xgr.TokenizerInfo, tokenizer: Any) -> None:
        self.size = info.vocab_size
        self.tokens: list[bytes] = [bytes(b) for b in info.decoded_vocab]
        special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        special |= set(getattr(tokenizer, "all_special_ids", []) or [])
        self.special = frozenset(i for i in special if 0 <= i < self.size)
        # Tokens with a raw control byte: never valid in compact JSON (xgrammar's bounded
        # strings would admit them, and json.loads rejects them).
        control = re.compile(rb"[\x00-\x1f]")
        self.control = frozenset(i for i, t in enumerate(self.tokens) if control.search(t)) - self.special
        # Of those, the ones whose control bytes are all layout (newline, tab, carriage return):
        # admitted between tokens where the grammar allows whitespace, never inside a string.
        # ``strung[(in_string, escape)]``: the layout tokens that, starting from that text state,
        # would put a control byte inside a string (``"}},\n`` closes its string first: admitted).
        layout = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
        self.layout = frozenset(i for i in self.control if not layout.search(self.tokens[i]))
        self.strung = {
            (in_string, escape): np.array(sorted(
                i for i in self.layout if _control_in_string(self.tokens[i], _TextState(in_string, escape))),
                dtype=np.int64)
            for in_string, escape in ((False, False), (True, False), (True, True))
        }
        # Token bytes -> id (first id wins), special tokens left out: to spell out a completion.
        self.lookup: dict[bytes, int] = {}
        for i, data in enumerate(self.tokens):
            if data and i not in self.special:
                self.lookup.setdefault(data, i)
        self.max_token_bytes = min(max((len(t) for t in self.lookup), default=1), 64)
        single = {b: self.lookup[bytes([b])] for b in range(256) if bytes([b]) in self.lookup}
        self.bytes = list(single)
        self.missing_bytes = [b for b in range(256) if b not in single]
        ids = np.array(list(single.values()), dtype=np.int64)
        self.byte_word, self.byte_shift = ids >> 5, (ids & 31).astype(np.int32)
        # Bytes each token adds to an open JSON string (+1 for a dangling backslash), when
        # the string's last byte is not / is a backslash awaiting its escaped character.
        plain = np.fromiter((len(t) for t in self.tokens), dtype=np.int32, count=len(self.tokens))
        pending = plain.copy()
        for i, data in enumerate(self.tokens):
            if b'"' in data or b"\\" in data:
                plain[i] = _string_bytes(data, escape=False)
                pending[i] = _string_bytes(data, escape=True)
        self._string_need = (plain, pending)
        self.max_string_need = int(max(plain.max(initial=0), pending.max(initial=0)))

    def string_need(self, escaped: bool) -> np.ndarray:
        return self._string_need[1 if escaped else 0]


def _control_in_string(data: bytes, state: _TextState) -> bool:
    """Whether ``data`` fed from ``state`` has a control byte while a JSON string is open."""
    for byte in data:
        if byte < 0x20 and state.in_string:
            return True
        state.feed(bytes([byte]))
    return False


def _string_bytes(data: bytes, escape: bool) -> int:
    """Bytes ``data`` adds to an open string before closing it, +1 if it ends in a pending escape."""
    count = 0
    for byte in data:
        if escape:
            escape, count = False, count + 1
        elif byte == 0x5C:
            escape, count = True, count + 1
        elif byte == 0x22:
            return count
        else:
            count += 1
    return count + (1 if escape else 0)


class GrammarCache:
    """One xgrammar ``TokenizerInfo``/``GrammarCompiler`` for a tokenizer and an LRU of compiled grammars.

    ``vocab_size``: the model's logits width when it exceeds ``len(tokenizer)``
    (Qwen pads its embedding): pass ``model.config.vocab_size``. ``stop_token_ids``
    default to xgrammar's detection (the tokenizer's EOS). ``compiles``/``hits``
    count compilations and cache hits; ``compile_seconds`` is the total compile time.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        stop_token_ids: int | list[int] | None = None,
        max_entries: int = 64,
        max_threads: int = 2,
    ) -> None:
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        # xgrammar's own cache is keyed by the schema string too; ours also holds the ToolGrammar.
        self.compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self.max_entries = max_entries
        self.compiles = self.hits = 0
        self.compile_seconds = 0.0
        self._grammars: OrderedDict[str, ToolGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.vocab = _Vocab(self.tokenizer_info, tokenizer)

    def compile(self, schema: dict[str, Any], string_cap: int | None = None, whitespace: int = 0) -> ToolGrammar:
        """Compiled grammar of any JSON ``schema`` (properties in order).

        ``whitespace``: 0 gives compact JSON (``", "`` and ``": "`` separators); above 0 the
        grammar also admits runs of up to that many whitespace characters between tokens.
        With ``string_cap``, ``maxLength`` bounds of at least ``string_cap`` are taken
        out of the grammar (so those strings may contain escapes) and the processor
        holds every string to ``string_cap`` bytes instead.
        """
        if string_cap is not None and string_cap < _MIN_RUNTIME_STRING_CAP:
            string_cap = None
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))  # key order matters: no sort
        key = hashlib.sha256(f"{string_cap}\n{whitespace}\n{text}".encode()).hexdigest()
        with self._lock:
            cached = self._grammars.get(key)
            if cached is not None:
                self._grammars.move_to_end(key)
                self.hits += 1
                return cached
            start = time.perf_counter()
            if string_cap is not None:
                text = json.dumps(_grammar_schema(schema, string_cap), ensure_ascii=False, separators=(",", ":"))
            layout: dict[str, Any] = {"any_whitespace": False}
            if whitespace > 0:
                layout = {"any_whitespace": True, "max_whitespace_cnt": whitespace}
            compiled = self.compiler.compile_json_schema(text, strict_mode=True, **layout)
            self.compile_seconds += time.perf_counter() - start
            self.compiles += 1
            grammar = ToolGrammar(compiled=compiled, schema=schema, string_cap=string_cap, key=key,
                                  whitespace=whitespace)
            self._grammars[key] = grammar
            while len(self._grammars) > self.max_entries:
                self._grammars.popitem(last=False)
            return grammar

    def compile_tools(
        self,
        tools: Sequence[dict[str, Any]],
        allow_no_call: bool = False,
        max_calls: int = 1,
        *,
        max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> ToolGrammar:
        """Compiled grammar of :func:`tool_call_schema` for ``tools`` (compiled once per tool set).
        Where a list of calls is allowed, the reply may be laid out over lines (:data:`LIST_WHITESPACE`)."""
        schema = tool_call_schema(
            tools, allow_no_call, max_calls, max_string_length=max_string_length, max_items=max_items
        )
        return self.compile(schema, string_cap=max_string_length, whitespace=LIST_WHITESPACE if max_calls > 1 else 0)

    def processor(
        self,
        tools: Sequence[dict[str, Any]],
        *,
        max_new_tokens: int | None,
        prefix: str = "",
        allow_no_call: bool = False,
        max_calls: int = 1,
        stop_token_ids: int | Iterable[int] | None = None,
        max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
        max_items: int = DEFAULT_MAX_ITEMS,
        no_call_bias: float = 0.0,
        stop_at_choice: bool = False,
    ) -> ToolCallLogitsProcessor:
        """A fresh :class:`ToolCallLogitsProcessor` for one ``generate`` call (see there)."""
        grammar = self.compile_tools(
            tools, allow_no_call, max_calls, max_string_length=max_string_length, max_items=max_items
        )
        return ToolCallLogitsProcessor(
            grammar, self, max_new_tokens=max_new_tokens, prefix=prefix, stop_token_ids=stop_token_ids,
            no_call_bias=no_call_bias if allow_no_call else 0.0,
            tool_names=[function["name"] for function in openai_functions(tools)], stop_at_choice=stop_at_choice,
        )

    def __len__(self) -> int:
        return len(self._grammars)


_CACHES: weakref.WeakKeyDictionary[Any, dict[int | None, GrammarCache]] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def grammar_cache(tokenizer: Any, vocab_size: int | None = None) -> GrammarCache:
    """The shared :class:`GrammarCache` of ``tokenizer`` (one per tokenizer object and vocab size)."""
    with _CACHES_LOCK:
        per_size = _CACHES.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = GrammarCache(tokenizer, vocab_size=vocab_size)
        return per_size[vocab_size]


# --------------------------------------------------------------------------------------
# Completion search
# --------------------------------------------------------------------------------------

def _byte_order(preferred: str) -> tuple[int, ...]:
    """``preferred`` characters first, then the other printable ASCII bytes, then bytes >= 0x80.

    Control bytes never appear: raw in a string they break ``json.loads``.
    """
    head = [ord(c) for c in dict.fromkeys(preferred)]
    return tuple(head + [b for b in range(32, 256) if b not in head and b != 127])


_QUOTE, _COMMA = ord('"'), ord(",")
_MAX_BRANCHES = 24
_CLOSERS = tuple(ord(c) for c in "}]")
_OPENERS = tuple(ord(c) for c in ',:"{[')  # the colon: where whitespace is admitted it is not forced
_DIGITS = tuple(ord(c) for c in "0123456789")
_SIGNS = tuple(ord(c) for c in "-.")
_INSIDE = _byte_order('"' + string.ascii_lowercase + string.digits + string.ascii_uppercase + "_ -.")
_OUTSIDE_REST = _byte_order("ntf" + string.ascii_lowercase + string.ascii_uppercase + "_ ")


@dataclass
class _TextState:
    """Where the reply text stands: inside a JSON string or not, and that string's length so far."""

    in_string: bool = False
    escape: bool = False
    length: int = 0  # bytes of the open string

    def feed(self, data: bytes) -> None:
        in_string, escape, length = self.in_string, self.escape, self.length
        for byte in data:
            if in_string:
                if escape:
                    escape, length = False, length + 1
                elif byte == 0x5C:
                    escape, length = True, length + 1
                elif byte == 0x22:
                    in_string = False
                else:
                    length += 1
            elif byte == 0x22:
                in_string, length = True, 0
        self.in_string, self.escape, self.length = in_string, escape, length

    def copy(self) -> _TextState:
        return _TextState(self.in_string, self.escape, self.length)


class _ByteProbe:
    """Which single bytes a matcher accepts next, read off one token bitmask.

    Byte-level vocabularies have a token for (nearly) every byte; a byte without one
    is tested on a fork of the matcher, and only when no other byte fits.
    """

    def __init__(self, vocab: _Vocab) -> None:
        self.vocab = vocab
        self.buffer = xgr.allocate_token_bitmask(1, vocab.size)
        self.words = self.buffer.numpy()[0]

    def __call__(self, m: xgr.GrammarMatcher) -> set[int]:
        m.fill_next_token_bitmask(self.buffer)
        vocab = self.vocab
        bits = (self.words[vocab.byte_word] >> vocab.byte_shift) & 1
        return {byte for byte, bit in zip(vocab.bytes, bits.tolist(), strict=True) if bit}

    def others(self, m: xgr.GrammarMatcher) -> set[int]:
        return {b for b in self.vocab.missing_bytes if m.fork().accept_string(bytes([b]))}


def _candidates(allowed: set[int], st: _TextState) -> list[int]:
    """Next bytes worth trying on the way to a short completion, best first."""
    if st.escape:
        return [_QUOTE] if _QUOTE in allowed else sorted(allowed)[:1]  # any escape will do
    if st.in_string:
        if _QUOTE in allowed:
            return [_QUOTE]
        # A key or an enum value (a few bytes fit), free text short of its minLength or a
        # UTF-8 tail (many fit, any will do).
        out = [b for b in _INSIDE if b in allowed]
        return out[:1] if len(out) > _MAX_BRANCHES else out
    closers = [b for b in _CLOSERS if b in allowed]
    if closers:
        return closers
    out = [b for b in _OPENERS if b in allowed]
    if _COMMA not in out:  # after a number, a comma is shorter than more digits
        digits = [b for b in _DIGITS if b in allowed]
        out += digits[:1] if digits[:1] == [_DIGITS[0]] else digits
        if not digits:
            out += [b for b in _SIGNS if b in allowed]
    if not out:
        out = [b for b in _OUTSIDE_REST if b in allowed]  # null/true/false, odd grammars
    return out


def _complete(
    matcher: xgr.GrammarMatcher, state: _TextState, probe: _ByteProbe, max_nodes: int = 2000
) -> bytes | None:
    """A short completion of the grammar from ``matcher``'s state (the matcher is not changed).

    Uniform-cost search over bytes (cost: bytes appended), where each step appends
    one byte and then the jump-forward string (text the grammar forces). Strings are
    closed at once, containers as soon as the grammar allows, missing required keys
    get minimal values (``""``, ``0``, ``{}``...). None if nothing is found within
    ``max_nodes`` expansions.
    """
    if matcher.is_terminated():
        return b""
    counter = itertools.count()

    def advance(m: xgr.GrammarMatcher, st: _TextState, text: bytes) -> bytes | None:
        try:
            forced = m.find_jump_forward_string().encode()
        except UnicodeDecodeError:  # it starts inside a UTF-8 character: go byte by byte
            forced = b""
        if forced:
            if not m.accept_string(forced):
                return None
            st.feed(forced)
        return text + forced

    root, root_state = matcher.fork(), state.copy()
    start = advance(root, root_state, b"")
    if start is None:
        return None
    heap: list[tuple[int, int, bytes, xgr.GrammarMatcher, _TextState]] = [
        (len(start), next(counter), start, root, root_state)
    ]
    expanded = 0
    while heap and expanded < max_nodes:
        _, _, text, m, st = heapq.heappop(heap)
        if m.is_completed():
            return text
        expanded += 1
        candidates = _candidates(probe(m), st) or _candidates(probe.others(m), st)
        for byte in candidates:
            child, child_state = m.fork(), st.copy()
            data = bytes([byte])
            if not child.accept_string(data):
                continue
            child_state.feed(data)
            child_text = advance(child, child_state, text + data)
            if child_text is not None:
                heapq.heappush(heap, (len(child_text), next(counter), child_text, child, child_state))
    return None


# --------------------------------------------------------------------------------------
# Logits processor
# --------------------------------------------------------------------------------------


@dataclass
class _Row:
    matcher: xgr.GrammarMatcher
    text: _TextState
    accepted: int = 0  # generated tokens fed to the matcher
    plan: list[int] | None = None  # tokens being forced to close the reply
    need: int | None = None  # tokens the last closing plan took
    expected: tuple[int, list[int]] | None = None  # the token the guard found safe, and the plan after it
    next_plan: list[int] | None = None  # the closing plan from the current state, when known
    failed: bool = False
    head: bytes = b""  # the reply's first bytes (prefix included), up to the tool name of a single call
    no_call_margin: float | None = None  # see ToolCallLogitsProcessor.no_call_margins


class ToolCallLogitsProcessor(LogitsProcessor):
    """Masks logits to the tool-call grammar; one instance per ``generate`` call.

    ``prefix``: text already in the prompt after the generation prompt (the
    ``assistant_prefix``, e.g. ``'{"tool": "'``); the grammar starts after it.
    ``max_new_tokens``: the generation budget; None turns the budget guard off.
    ``stop_token_ids``: the ids ``generate`` stops on (``model.generation_config.eos_token_id``);
    default: the grammar's stop tokens. ``guard_window``/``guard_top_k``: once the
    remaining budget is within ``guard_window`` tokens of what closing the reply
    takes, each step checks the best tokens in score order (at most ``guard_top_k``,
    stopping at the first safe one) and bans those after which the reply could no
    longer be closed in time, and forces the closing tokens when none of them is safe.
    The window is wide because one token can raise the need a lot (choosing a tool
    with many required arguments). Greedy decoding thus ends with a complete reply
    whenever the budget allows one at all; sampling can still draw an unchecked
    token, and then :meth:`completion` finishes the reply.

    ``no_call_bias``: added to the log-score of the no-call answer where the reply chooses
    between it and the offered tools (``tool_names``), i.e. at the tool name of
    ``{"tool": "`` (leading whitespace aside): above 0 the model abstains more often. Only tokens
    that start ``none`` and no offered tool's name get it, so a tool named like ``nonempty``
    keeps its shared first tokens unbiased. While the reply chooses, each row records its
    :attr:`no_call_margins`; ``stop_at_choice`` ends the reply once it has chosen (a probe of the
    choice that costs a few tokens, not a reply).

    Works for batches (one matcher per row). Statistics: ``steps``, ``forced_tokens``,
    ``mask_seconds`` (time spent in this processor).
    """

    def __init__(
        self,
        grammar: ToolGrammar,
        cache: GrammarCache,
        *,
        max_new_tokens: int | None,
        prefix: str = "",
        stop_token_ids: int | Iterable[int] | None = None,
        guard_window: int = 48,
        guard_top_k: int = 3,
        no_call_bias: float = 0.0,
        tool_names: Iterable[str] = (),
        stop_at_choice: bool = False,
    ) -> None:
        self.grammar, self.cache, self.vocab = grammar, cache, cache.vocab
        self.no_call_bias, self.stop_at_choice = no_call_bias, stop_at_choice
        self._tool_names = [name.encode() for name in tool_names]
        self._no_call_tokens: dict[bytes, np.ndarray] = {}
        self.max_new_tokens, self.prefix = max_new_tokens, prefix
        if stop_token_ids is None:
            stops = list(cache.tokenizer_info.stop_token_ids)
        elif isinstance(stop_token_ids, int):
            stops = [stop_token_ids]
        else:
            stops = [int(s) for s in stop_token_ids]
        if not stops:
            raise ValueError("no stop token ids: pass stop_token_ids (the model's eos_token_id)")
        self.stop_token_ids = stops
        self.guard_window, self.guard_top_k = guard_window, guard_top_k
        self.rows: list[_Row] = []
        self.prompt_len = 0
        self.steps = self.forced_tokens = 0
        self.mask_seconds = 0.0
        self._bitmask: torch.Tensor | None = None
        self._probe = _ByteProbe(self.vocab)
        self._layout = bool(grammar.whitespace)  # layout tokens admitted where they put no control byte in a string
        layout = self.vocab.layout if self._layout else frozenset()
        self._banned = np.array(sorted((self.vocab.special | self.vocab.control) - layout - set(stops)), dtype=np.int64)
        self._check_prefix()

    # -- state -----------------------------------------------------------------------------

    def _new_row(self) -> _Row:
        matcher = xgr.GrammarMatcher(self.grammar.compiled, override_stop_tokens=self.stop_token_ids)
        text = _TextState()
        if self.prefix:
            if not matcher.accept_string(self.prefix):
                raise ValueError(f"the grammar does not accept the prefix {self.prefix!r}")
            text.feed(self.prefix.encode())
        row = _Row(matcher=matcher, text=text)
        self._track_head(row, self.prefix.encode())
        return row

    def _no_call_choice(self, head: bytes) -> np.ndarray:
        """Tokens that, written after ``head``, choose the no-call answer over every offered tool:
        they reach into the tool name and spell the start of ``none"`` but of no ``<tool>"``."""
        tokens = self._no_call_tokens.get(head)
        if tokens is None:
            def after_head(name: bytes) -> bytes:
                return (_CALL_OPENING + name + b'"')[len(head):]

            others = [after_head(name) for name in self._tool_names]
            wanted = after_head(NO_CALL_TOOL.encode())
            reach = len(_CALL_OPENING) - len(head)
            spellings = [wanted[:size] for size in range(reach + 1, len(wanted) + 1)]
            ids = {self.vocab.lookup[data] for data in spellings if data in self.vocab.lookup
                   and not any(other.startswith(data) for other in others)}
            tokens = self._no_call_tokens[head] = np.array(sorted(ids), dtype=np.int64)
        return tokens

    @staticmethod
    def _choosing(row: _Row) -> bool:
        """Whether the reply has not yet chosen between the offered tools and the no-call answer."""
        return _CALL_OPENING.startswith(row.head)

    @staticmethod
    def _track_head(row: _Row, data: bytes) -> None:
        if len(row.head) <= len(_CALL_OPENING):
            row.head = (row.head + data).lstrip()[: len(_CALL_OPENING) + 1]

    def _check_prefix(self) -> None:
        self._new_row()  # raises early on a prefix the grammar rejects

    @property
    def no_call_margins(self) -> list[float | None]:
        """Per row: the largest gap, over the steps where the reply chose its tool, between the best
        token that chooses the no-call answer and the best other admissible token (before
        ``no_call_bias``). Greedy decoding answers "no tool" exactly when margin + bias > 0: until a
        step flips, the bias changes no choice. None where no step offered the no-call answer."""
        return [row.no_call_margin for row in self.rows]

    def _record_choice(self, row: _Row, row_scores: np.ndarray) -> None:
        choice = self._no_call_choice(row.head)
        choice = choice[choice < row_scores.shape[0]]
        if not choice.size:
            return
        chosen = row_scores[choice]
        best = float(chosen.max())
        if not np.isfinite(best):
            return  # the grammar does not offer the no-call answer here
        row_scores[choice] = -np.inf
        margin = best - float(row_scores.max())
        row_scores[choice] = chosen
        row.no_call_margin = margin if row.no_call_margin is None else max(row.no_call_margin, margin)

    def _accept(self, row: _Row, token: int) -> None:
        if row.failed or row.matcher.is_terminated():
            return
        if row.matcher.accept_token(token):
            row.accepted += 1
            if 0 <= token < len(self.vocab.tokens) and token not in self.stop_token_ids:
                row.text.feed(self.vocab.tokens[token])
                self._track_head(row, self.vocab.tokens[token])
            if row.plan:
                if row.plan[0] == token:
                    row.plan.pop(0)
                else:
                    row.plan = None
            if row.expected is not None and row.expected[0] == token:
                row.next_plan = row.expected[1]
            row.expected = None
        else:
            log.warning("constrained generation: token %d rejected by the grammar; ending the reply", token)
            row.failed = True

    # -- budget ----------------------------------------------------------------------------

    def _tokenize_completion(self, matcher: xgr.GrammarMatcher, data: bytes) -> list[int] | None:
        """Tokens spelling ``data`` from ``matcher``'s state (greedy longest match the matcher accepts)."""
        lookup, longest = self.vocab.lookup, self.vocab.max_token_bytes
        probe = matcher.fork()
        tokens: list[int] = []
        position = 0
        while position < len(data):
            for size in range(min(longest, len(data) - position), 0, -1):
                token = lookup.get(data[position:position + size])
                if token is not None and probe.fork().accept_token(token):
                    probe.accept_token(token)
                    tokens.append(token)
                    position += size
                    break
            else:
                return None
        return tokens

    def _closing_plan(self, matcher: xgr.GrammarMatcher, text: _TextState) -> list[int] | None:
        completion = _complete(matcher, text, self._probe)
        if completion is None:
            return None
        return self._tokenize_completion(matcher, completion)

    def _plan_after(self, row: _Row, token: int) -> list[int] | None:
        """The closing plan after ``token`` (None: the token is not admissible or closing fails)."""
        if token in self.stop_token_ids:
            return [] if row.matcher.is_completed() else None
        branch = row.matcher.fork()
        if not branch.accept_token(token):
            return None
        text = row.text.copy()
        text.feed(self.vocab.tokens[token])
        return self._closing_plan(branch, text)

    def _guard(self, row: _Row, scores: np.ndarray, remaining: int) -> int | None:
        """Keep the reply closable in the ``remaining`` tokens: ban the best tokens that would not
        leave it so, or return the first token of the closing plan to force when none will.

        Far from the end (``remaining`` more than ``guard_window`` tokens above what closing
        takes) it does nothing but re-estimate that every few steps. Near it, the best tokens
        are checked in score order (at most ``guard_top_k``); unsafe ones are banned until
        the best left is safe, so greedy decoding always takes the best safe token.
        """
        if row.matcher.is_completed():
            return None  # only stop tokens are left
        plan = row.next_plan
        row.next_plan = None
        if plan is None:
            far = row.need is not None and remaining > row.need + self.guard_window
            if far and remaining % _GUARD_RECHECK:
                return None  # far from the end: the last estimate is good enough for now
            plan = self._closing_plan(row.matcher, row.text)
            if plan is None:
                return None
        row.need = len(plan)
        if remaining > len(plan) + self.guard_window:
            return None
        k = min(self.guard_top_k, scores.shape[0])
        top = np.argpartition(scores, -k)[-k:]
        for token in top[np.argsort(-scores[top], kind="stable")].tolist():
            if not np.isfinite(scores[token]):
                break
            after = self._plan_after(row, token)
            if after is not None and len(after) <= remaining - 1:
                row.expected = (token, after)
                return None
            scores[token] = -np.inf
        row.plan = plan
        return plan[0] if plan else None

    # -- LogitsProcessor ------------------------------------------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.perf_counter()
        batch = input_ids.shape[0]
        if not self.rows:
            self.rows = [self._new_row() for _ in range(batch)]
            self.prompt_len = input_ids.shape[1]
            self._bitmask = xgr.allocate_token_bitmask(batch, self.vocab.size)
        elif len(self.rows) != batch:
            raise RuntimeError(f"batch size changed from {len(self.rows)} to {batch}; use one processor per generate")
        else:
            for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
                self._accept(row, int(token))
        generated = input_ids.shape[1] - self.prompt_len
        remaining = None if self.max_new_tokens is None else self.max_new_tokens - generated

        assert self._bitmask is not None
        width = scores.shape[-1]
        masked_width = min(width, self.vocab.size)
        forced: dict[int, int] = {}
        for i, row in enumerate(self.rows):
            if row.failed or row.matcher.is_terminated() or self.stop_at_choice and not self._choosing(row):
                forced[i] = self.stop_token_ids[0]
            elif row.plan:
                forced[i] = row.plan[0]
            else:
                row.matcher.fill_next_token_bitmask(self._bitmask, i)
                continue
            xgr.reset_token_bitmask(self._bitmask[i:i + 1])
        # Row work is done in numpy: small torch ops cost milliseconds on a busy multi-threaded CPU.
        native = scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64, torch.float16)
        work = scores if native else scores.detach().float().cpu()
        xgr.apply_token_bitmask_inplace(work, self._bitmask, vocab_size=masked_width)
        array = work.numpy()
        if width > self.vocab.size:
            array[:, self.vocab.size:] = -np.inf
        banned = self._banned[self._banned < width]
        if banned.size:
            array[:, banned] = -np.inf

        cap = self.grammar.string_cap
        for i, row in enumerate(self.rows):
            if i in forced:
                continue
            row_scores = array[i]
            if self._choosing(row):
                self._record_choice(row, row_scores)
                if self.no_call_bias:
                    row_scores[self._no_call_choice(row.head)] += self.no_call_bias
            if self._layout:
                strung = self.vocab.strung[(row.text.in_string, row.text.escape)]
                row_scores[strung[strung < width]] = -np.inf
            if cap is not None and row.text.in_string and cap - row.text.length < self.vocab.max_string_need:
                need = self.vocab.string_need(row.text.escape)[:masked_width]
                row_scores[:masked_width][need > cap - row.text.length] = -np.inf
            if remaining is not None:
                token = self._guard(row, row_scores, remaining)
                if token is not None:
                    forced[i] = token
            if i not in forced and not np.isfinite(row_scores.max()):
                # Nothing admissible is left (should not happen): close the reply instead.
                plan = self._closing_plan(row.matcher, row.text)
                row.plan = plan or None
                forced[i] = plan[0] if plan else self.stop_token_ids[0]

        for i, token in forced.items():
            self.forced_tokens += 1
            array[i].fill(-np.inf)
            array[i, token] = 0.0
        if work is not scores:
            scores.copy_(work.to(device=scores.device, dtype=scores.dtype))
        self.steps += 1
        self.mask_seconds += time.perf_counter() - start
        return scores

    # -- drafting ---------------------------------------------------------------------------

    def forced_after(self, token: int, row: int = 0) -> list[int]:
        """Tokens spelling what the grammar forces once ``token`` (chosen, not yet seen by this
        processor) is accepted: a guess of the next tokens for speculative decoding. Empty
        when nothing is forced, ``token`` ends the reply, or the reply is being closed."""
        if not self.rows or token in self.stop_token_ids:
            return []
        state = self.rows[row]
        if state.failed or state.plan or state.matcher.is_terminated():
            return []
        branch = state.matcher.fork()
        if not branch.accept_token(token):
            return []
        forced = branch.find_jump_forward_string()
        if not forced:
            return []
        data = forced.encode()
        # The longest spelling first; its last token may still merge with what follows.
        tokens = self._tokenize_completion(branch, data)
        return tokens or []

    # -- after generation -------------------------------------------------------------------

    def completion(self, new_tokens: Sequence[int] | torch.Tensor, row: int = 0) -> str:
        """Text to append to the decoded reply so that it is complete (``""`` when it already is).

        ``new_tokens``: the generated tokens of ``row`` (without the prompt); the last one
        never reaches the processor during ``generate``, so it is fed to the matcher here.
        Call it once, after ``generate``.
        """
        if isinstance(new_tokens, torch.Tensor):
            new_tokens = new_tokens.tolist()
        if not self.rows:  # generate produced nothing
            self.rows = [self._new_row()]
        state = self.rows[row]
        for token in list(new_tokens)[state.accepted:]:
            if state.failed or state.matcher.is_terminated() or token in self.stop_token_ids:
                break
            self._accept(state, int(token))
        if state.failed:
            return ""
        if state.matcher.is_completed():
            return ""
        completion = _complete(state.matcher, state.text, self._probe, max_nodes=20000)
        if completion is None:
            log.warning("constrained generation: no completion found for a cut-off reply")
            return ""
        return completion.decode("utf-8", errors="replace")

    def is_complete(self, row: int = 0) -> bool:
        """Whether the tokens fed so far form a complete reply."""
        return bool(self.rows) and self.rows[row].matcher.is_completed()
