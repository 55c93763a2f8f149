"""Read the Berkeley Function Calling Leaderboard (BFCL) data shipped in the ``bfcl-eval`` wheel.

The wheel (Apache-2.0) is installed ``--no-deps`` from ``requirements/eval-data.txt``: only its
bundled JSON-lines files are read here, its Python modules (model handlers, SDK clients) are never
imported. Each category lives in ``bfcl_eval/data/BFCL_v<N>_<category>.json`` (one question per
line) with the possible answers, where the category has them, in ``data/possible_answer/`` under
the same file name.

Only the single-turn Python categories are supported; multi-turn, agentic (memory, web search),
format-sensitivity and the Java / JavaScript categories need machinery this module does not have.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "AST_CATEGORIES",
    "BFCL_EVAL_VERSION",
    "BfclAnswer",
    "BfclDataMissing",
    "BfclMessage",
    "BfclQuestion",
    "CATEGORIES",
    "PYTHON_HINT",
    "category_kind",
    "data_dir",
    "from_tool_name",
    "load_category",
    "to_json_schema",
    "to_tool",
    "tool_name",
    "tool_name_map",
]

# The version pinned in requirements/eval-data.txt (a test keeps the two in step).
BFCL_EVAL_VERSION = "2026.3.23"
PACKAGE = "bfcl_eval"

# Categories scored by the AST checker: every one has possible answers.
AST_CATEGORIES: tuple[str, ...] = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
# Categories without possible answers: irrelevance wants no call, relevance at least one.
IRRELEVANCE_CATEGORIES: tuple[str, ...] = ("irrelevance", "live_irrelevance")
RELEVANCE_CATEGORIES: tuple[str, ...] = ("live_relevance",)
CATEGORIES: tuple[str, ...] = AST_CATEGORIES + IRRELEVANCE_CATEGORIES + RELEVANCE_CATEGORIES

# BFCL appends this to every function description of a Python category before prompting
# (its ``load_dataset_entry(include_language_specific_hint=True)``, the default).
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."


class BfclDataMissing(RuntimeError):
    """The ``bfcl-eval`` package, whose data files this module reads, is not installed."""


class BfclMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class BfclQuestion(BaseModel):
    """One BFCL test entry: the conversation so far and the functions the model may call.

    ``functions`` are BFCL function docs as shipped (``name``, ``description`` and
    ``parameters`` with BFCL's types such as ``dict``, ``float``, ``tuple``, ``any``);
    :func:`to_json_schema` / :func:`to_tool` turn one into standard JSON Schema.
    """

    id: str
    category: str
    messages: list[BfclMessage]
    functions: list[dict[str, Any]]

    def tools(self) -> list[dict[str, Any]]:
        """The functions as OpenAI-style tools (sanitised names, JSON Schema parameters);
        map a called tool name back with :func:`from_tool_name`."""
        names = {original: sanitised for sanitised, original in tool_name_map(self.functions).items()}
        return [to_tool(function, names[function["name"]]) for function in self.functions]


class BfclAnswer(BaseModel):
    """The possible answers of one entry: one ``{function name: {param: [acceptable values]}}``
    per expected call. ``""`` among a parameter's acceptable values means it may be omitted."""

    id: str
    ground_truth: list[dict[str, dict[str, Any]]]


def category_kind(category: str) -> Literal["ast", "irrelevance", "relevance"]:
    """How a category is scored: against possible answers, or by whether any call was made."""
    if category in IRRELEVANCE_CATEGORIES:
        return "irrelevance"
    if category in RELEVANCE_CATEGORIES:
        return "relevance"
    if category in AST_CATEGORIES:
        return "ast"
    raise ValueError(f"unsupported BFCL category {category!r}; supported: {', '.join(CATEGORIES)}")


@functools.cache
def data_dir() -> Path:
    """The ``data`` folder of the installed ``bfcl-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "data"
        if candidate.is_dir():
            return candidate
    raise BfclDataMissing(
        "BFCL data not found: the 'bfcl-eval' package is not installed in this environment. "
        "Run `make venv` (the set-up `make test` runs) or install it alone with "
        f"`.venv/bin/pip install --no-deps bfcl-eval=={BFCL_EVAL_VERSION}` "
        "(pinned in requirements/eval-data.txt; --no-deps matters: only its data files are used)."
    )


def _data_file(folder: Path, category: str) -> Path:
    """``BFCL_v<N>_<category>.json`` in ``folder``, the highest ``N`` when several exist."""
    pattern = re.compile(rf"BFCL_v(\d+)_{re.escape(category)}\.json")
    found = [
        (int(match.group(1)), path)
        for path in folder.glob(f"BFCL_v*_{category}.json")
        if (match := pattern.fullmatch(path.name))
    ]
    if not found:
        raise FileNotFoundError(f"no BFCL data file for category {category!r} in {folder}")
    return max(found)[1]


@functools.cache
def _read_jsonl(path: Path) -> tuple[dict[str, Any], ...]:
    with path.open(encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def _question(entry: dict[str, Any], category: str, language_hint: bool) -> BfclQuestion:
    turns = entry["question"]
    if len(turns) != 1:
        raise ValueError(f"{entry['id']}: {len(turns)} turns; only single-turn entries are supported")
    functions = copy.deepcopy(entry["function"])
    if language_hint:
        for function in functions:
            function["description"] = function.get("description", "") + PYTHON_HINT
    return BfclQuestion(id=entry["id"], category=category, messages=turns[0], functions=functions)


def _sample_key(seed: int, entry_id: str) -> str:
    # A hash rather than `random`: the same ids come out on every platform and Python version,
    # and a smaller limit picks a subset of a larger one.
    return hashlib.sha256(f"{seed}:{entry_id}".encode()).hexdigest()


def load_category(
    category: str,
    limit: int | None = None,
    seed: int | None = None,
    *,
    language_hint: bool = True,
) -> list[tuple[BfclQuestion, BfclAnswer | None]]:
    """The entries of one category, each with its possible answers (``None`` for the
    irrelevance / relevance categories, which have none).

    With ``limit``, a fixed pseudo-random sample of that many entries (``seed`` defaults to 0),
    the same on every run, returned in file order. ``language_hint`` appends BFCL's own
    "Python 3 syntax" note to each function description, as BFCL does before prompting.
    """
    kind = category_kind(category)
    folder = data_dir()
    entries = _read_jsonl(_data_file(folder, category))
    answers: dict[str, dict[str, Any]] = {}
    if kind == "ast":
        answer_file = _data_file(folder / "possible_answer", category)
        answers = {row["id"]: row for row in _read_jsonl(answer_file)}

    if limit is not None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        chosen = sorted(entries, key=lambda entry: _sample_key(seed or 0, entry["id"]))[:limit]
        keep = {entry["id"] for entry in chosen}
        entries = tuple(entry for entry in entries if entry["id"] in keep)

    result: list[tuple[BfclQuestion, BfclAnswer | None]] = []
    for entry in entries:
        answer = None
        if kind == "ast":
            if entry["id"] not in answers:
                raise ValueError(f"{entry['id']}: no possible answer in the BFCL data")
            answer = BfclAnswer.model_validate(copy.deepcopy(answers[entry["id"]]))  # cache stays intact
        result.append((_question(entry, category, language_hint), answer))
    return result


# --- JSON Schema ---------------------------------------------------------------------------

# BFCL's own mapping to OpenAPI types (bfcl_eval.constants.type_mappings.GORILLA_TO_OPENAPI),
# restricted to the Python names; "any" is left unconstrained here where BFCL says "string".
_TYPE_MAP = {
    "integer": "integer",
    "number": "number",
    "float": "number",
    "string": "string",
    "boolean": "boolean",
    "bool": "boolean",
    "array": "array",
    "list": "array",
    "tuple": "array",
    "dict": "object",
    "object": "object",
}
# BFCL-only annotations with no JSON Schema meaning.
_DROPPED_KEYS = {"optional"}


def _schema(node: dict[str, Any]) -> dict[str, Any]:
    bfcl_type = node.get("type")
    out: dict[str, Any] = {}
    if bfcl_type != "any":
        # Missing or unknown types become "string", as BFCL's own conversion does.
        out["type"] = _TYPE_MAP.get(bfcl_type, "string") if isinstance(bfcl_type, str) else "string"
    for key, value in node.items():
        if key == "type" or key in _DROPPED_KEYS:
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _schema(sub) for name, sub in value.items() if isinstance(sub, dict)}
        elif key == "items" and isinstance(value, dict):
            out[key] = _schema(value)
        elif key == "required" and not isinstance(value, list):
            continue  # a stray boolean flag on a property, not a list of names
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_json_schema(function: dict[str, Any]) -> dict[str, Any]:
    """Standard JSON Schema for a BFCL function's parameters (``function["parameters"]``).

    ``dict`` -> ``object``, ``float`` -> ``number``, ``tuple`` -> ``array``, ``any`` -> no type
    constraint; nested ``properties`` / ``items`` are converted too, BFCL's ``optional`` flag is
    dropped and ``required`` is kept. Given a bare schema node (no ``parameters`` key), converts
    that node instead.
    """
    if "parameters" not in function:
        return _schema(function)
    schema = _schema(function["parameters"])
    schema["type"] = "object"
    schema.setdefault("properties", {})
    schema.setdefault("required", [])
    return schema


# --- tool names ----------------------------------------------------------------------------

_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def tool_name(name: str) -> str:
    """A BFCL function name as a tool name most APIs accept (``^[A-Za-z0-9_-]{1,64}$``):
    ``math.factorial`` -> ``math_factorial``, as BFCL itself does for such models."""
    return _INVALID_NAME_CHARS.sub("_", name)[:64] or "_"


def tool_name_map(functions: list[dict[str, Any]]) -> dict[str, str]:
    """``{tool name: BFCL name}`` for one question's functions. Sanitised names that collide
    get a numeric suffix (none do in the shipped data)."""
    mapping: dict[str, str] = {}
    for function in functions:
        original = function["name"]
        candidate, counter = tool_name(original), 2
        while candidate in mapping:
            suffix = f"_{counter}"
            candidate, counter = tool_name(original)[: 64 - len(suffix)] + suffix, counter + 1
        mapping[candidate] = original
    return mapping


def from_tool_name(name: str, functions: list[dict[str, Any]]) -> str:
    """The inverse of :func:`tool_name` for one question: an exact BFCL name is kept as is, a
    sanitised one is mapped back, anything else is returned unchanged (and will not match)."""
    if any(function["name"] == name for function in functions):
        return name
    return tool_name_map(functions).get(name, name)


def to_tool(function: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """A BFCL function doc as an OpenAI-style tool: sanitised name and JSON Schema parameters."""
    return {
        "type": "function",
        "function": {
            "name": name or tool_name(function["name"]),
            "description": function.get("description", ""),
            "parameters": to_json_schema(function),
        },
    }

