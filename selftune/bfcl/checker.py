"""Score a model's function calls against BFCL's possible answers with BFCL's AST-checker rules.

This re-implements the rules of ``bfcl_eval/eval_checker/ast_eval/ast_checker.py`` (Python
language only) rather than importing it: that module imports ``bfcl_eval.constants.model_config``,
which imports every model handler and with them the vendor SDKs the wheel's ``--no-deps``
install leaves out. The rules, and their quirks, are kept as BFCL has them, so a score here is
a BFCL AST score:

* one call for the simple categories; for "multiple" exactly one call, checked against the
  one expected function; for "parallel*" one call per expected call, matched in any order
  (each expected call, in turn, takes the first unmatched call that passes);
* the function name must match; every required parameter must be present; a parameter the
  function does not declare, or that the possible answer does not list, is rejected; a listed
  parameter may only be omitted when ``""`` is among its acceptable values;
* types are checked exactly (``bool`` is not an ``int``), except that an ``int`` is accepted for a
  top-level ``float`` parameter and a tuple for a ``tuple`` one; ``any`` means a string; when
  the acceptable values have another type than the declared one (a "variable"), a value of the
  acceptable values' type passes the type check and is compared as is;
* array / tuple elements are type-checked one level deep against each acceptable list;
* strings are compared after dropping spaces and ``,./-_*^``, lowercasing, and turning ``'``
  into ``"`` (the same for string elements of lists and string values of dicts);
* a dict must match one acceptable dict key by key; a list of dicts must match one acceptable
  list dict by dict, in order;
* irrelevance categories pass iff no call was made, relevance categories iff one was.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from selftune.bfcl.data import BfclAnswer, BfclQuestion, category_kind, from_tool_name

__all__ = ["CheckResult", "check", "gold_calls", "normalize_string"]

Call = tuple[str, dict[str, Any]]

# BFCL's Python type names -> the Python type a value must have.
_PY_TYPES: dict[str, type] = {
    "string": str,
    "integer": int,
    "float": float,
    "boolean": bool,
    "array": list,
    "tuple": list,
    "dict": dict,
    "any": str,
}
# Not in BFCL's Python table (it would fail on them); absent from the Python categories' data.
_PY_TYPES_EXTRA: dict[str, type] = {"number": float, "object": dict, "list": list, "bool": bool}
_ELEMENT_CHECKED = ("array", "tuple")
_OPTIONAL = ""


class CheckResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    valid: bool
    error: str | None = None
    error_type: str | None = None


class _Fail(Exception):
    def __init__(self, error: str, error_type: str) -> None:
        super().__init__(error)
        self.error, self.error_type = error, error_type


_PUNCTUATION = re.compile(r"[ ,./\-_*^]")


def normalize_string(text: str) -> str:
    """BFCL's string normalisation: no spaces or ``,./-_*^``, lower case, ``'`` as ``"``."""
    return _PUNCTUATION.sub("", text).lower().replace("'", '"')


def _norm(value: Any) -> Any:
    return normalize_string(value) if isinstance(value, str) else value


def _as_list(values: Any) -> list[Any]:
    return values if isinstance(values, list) else [values]


def _py_type(bfcl_type: Any) -> type:
    if bfcl_type in _PY_TYPES:
        return _PY_TYPES[bfcl_type]
    return _PY_TYPES_EXTRA.get(bfcl_type, str)


def _answer_type(acceptable: list[Any]) -> type | None:
    """The type of the first acceptable value that is not the "may omit" marker."""
    return next((type(value) for value in acceptable if value != _OPTIONAL), None)


# --- type check ---------------------------------------------------------------------------


def _type_check(
    param: str, value: Any, acceptable: list[Any], declared: str, expected: type, element: type | None
) -> bool:
    """Raise on a type mismatch; return whether the value is a "variable" (the acceptable values
    are of another type than the declared one), which skips the structural comparisons."""
    answer_type = _answer_type(acceptable)
    is_variable = answer_type is not None and answer_type is not expected

    if type(value) is expected:
        if element is None:
            return is_variable
        # One level deep: every element must fit some acceptable list. An acceptable value
        # that is not a list (the "" marker, a variable) imposes nothing.
        for option in acceptable:
            if not isinstance(option, list):
                return is_variable
            if all(_element_fits(item, option, element) for item in value):
                return is_variable
        raise _Fail(
            f"parameter {param!r}: expected {declared} of {element.__name__}, "
            f"an element has another type: {value!r}",
            "type_error:nested",
        )

    if answer_type is not None and type(value) is answer_type:
        return True
    raise _Fail(
        f"parameter {param!r}: expected type {declared}, got {type(value).__name__} ({value!r})",
        "type_error:simple",
    )


def _element_fits(item: Any, option: list[Any], element: type) -> bool:
    if type(item) is element:
        return True
    answer_type = _answer_type(option)
    return answer_type is not None and type(item) is answer_type


# --- value checks -------------------------------------------------------------------------


def _string_matches(value: str, acceptable: list[Any]) -> bool:
    allowed = [normalize_string(option) for option in acceptable if isinstance(option, str)]
    return normalize_string(value) in allowed


def _list_matches(value: list[Any], acceptable: list[Any]) -> bool:
    normalized = [_norm(item) for item in value]
    for option in acceptable:
        if option == _OPTIONAL:
            option = []  # BFCL's comparison turns the "may omit" marker into an empty list
        if isinstance(option, (list, tuple)) and normalized == [_norm(item) for item in option]:
            return True
    return False


def _dict_error(value: Any, option: Any) -> str | None:
    """Why ``value`` does not match one acceptable dict (``None`` when it does)."""
    if not isinstance(value, dict):
        return f"expected a dict, got {type(value).__name__}"
    if not isinstance(option, dict):
        return f"acceptable value {option!r} is not a dict"
    for key, item in value.items():
        if key not in option:
            return f"unexpected dict key {key!r}"
        allowed = [_norm(choice) for choice in _as_list(option[key])]
        if _norm(item) not in allowed:
            return f"dict key {key!r}: {item!r} is not one of {_as_list(option[key])!r}"
    for key, allowed in option.items():
        if key not in value and _OPTIONAL not in _as_list(allowed):
            return f"missing dict key {key!r}"
    return None


def _check_dict(param: str, value: Any, acceptable: list[Any]) -> None:
    error = "no acceptable dict"
    for option in acceptable:
        if option == _OPTIONAL:
            continue
        error = _dict_error(value, option)
        if error is None:
            return
    raise _Fail(f"parameter {param!r}: {error}", "value_error:dict")


def _check_dict_list(param: str, value: list[Any], acceptable: list[Any]) -> None:
    error = "no acceptable list of dicts"
    for option in acceptable:
        option = [] if option == _OPTIONAL else _as_list(option)
        if len(option) != len(value):
            error = f"{len(value)} dicts, expected {len(option)}"
            continue
        errors = [_dict_error(item, expected) for item, expected in zip(value, option)]
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return
        error = first
    raise _Fail(f"parameter {param!r}: {error}", "value_error:list_dict")


# --- one call -----------------------------------------------------------------------------


def _check_call(function: dict[str, Any], call: Call, expected: dict[str, Any]) -> None:
    """Check one call against one expected ``{name: {param: acceptable}}``; raise on failure."""
    name, arguments = call
    acceptable_by_param: dict[str, Any] = next(iter(expected.values()))
    parameters = function.get("parameters", {})
    declared: dict[str, Any] = parameters.get("properties", {})
    required: list[str] = parameters.get("required", [])

    if name != function["name"]:
        raise _Fail(f"expected a call of {function['name']!r}, got {name!r}", "wrong_func_name")
    for param in required:
        if param not in arguments:
            raise _Fail(f"missing required parameter {param!r}", "missing_required")

    for param, value in arguments.items():
        if param not in declared or param not in acceptable_by_param:
            raise _Fail(f"unexpected parameter {param!r}", "unexpected_param")
        acceptable = _as_list(acceptable_by_param[param])
        declared_type = declared[param].get("type")
        expected_type = _py_type(declared_type)
        element = None
        if declared_type in _ELEMENT_CHECKED:
            items = declared[param].get("items")
            if isinstance(items, dict) and "type" in items:
                element = _py_type(items["type"])

        if declared_type == "tuple" and type(value) is tuple:
            value = list(value)
        if declared_type == "float" and type(value) is int:
            value = float(value)

        is_variable = _type_check(param, value, acceptable, str(declared_type), expected_type, element)

        if not is_variable:
            if expected_type is dict:
                _check_dict(param, value, acceptable)
                continue
            if expected_type is list and element is dict:
                _check_dict_list(param, value, acceptable)
                continue
            if expected_type is str:
                if not _string_matches(value, acceptable):
                    raise _Fail(
                        f"parameter {param!r}: {value!r} is not one of {acceptable!r} "
                        "(compared case-insensitively, ignoring spaces and ,./-_*^)",
                        "value_error:string",
                    )
                continue
            if expected_type is list:
                if not _list_matches(value, acceptable):
                    raise _Fail(
                        f"parameter {param!r}: {value!r} is not one of {acceptable!r}", "value_error:list"
                    )
                continue

        if value not in acceptable:
            raise _Fail(f"parameter {param!r}: {value!r} is not one of {acceptable!r}", "value_error:others")

    for param, acceptable in acceptable_by_param.items():
        if param not in arguments and _OPTIONAL not in _as_list(acceptable):
            raise _Fail(f"parameter {param!r} is missing and may not be omitted", "missing_optional")


def _function_doc(question: BfclQuestion, name: str) -> dict[str, Any]:
    for function in question.functions:
        if function["name"] == name:
            return function
    raise _Fail(f"the possible answer names {name!r}, which the question does not offer", "bad_answer")


def _check_ast(question: BfclQuestion, answer: BfclAnswer, calls: list[Call]) -> None:
    expected = answer.ground_truth
    category = question.category
    # Like BFCL: parallel and multiple want one call per expected call, the rest exactly one.
    wanted_count = len(expected) if ("parallel" in category or "multiple" in category) else 1
    if len(calls) != wanted_count:
        raise _Fail(f"expected {wanted_count} call(s), got {len(calls)}", "wrong_count")

    if "parallel" in category:
        unmatched = list(range(len(calls)))
        for position, wanted in enumerate(expected):
            function = _function_doc(question, next(iter(wanted)))
            errors: list[str] = []
            for index in unmatched:
                try:
                    _check_call(function, calls[index], wanted)
                except _Fail as failure:
                    errors.append(f"call {index}: {failure.error}")
                    continue
                unmatched.remove(index)
                break
            else:
                raise _Fail(
                    f"no call matches expected call {position} ({function['name']}): " + "; ".join(errors),
                    "parallel:no_match",
                )
        return

    # "multiple" and the simple categories: a single expected call.
    function = _function_doc(question, next(iter(expected[0])))
    _check_call(function, calls[0], expected[0])


def _normalise_calls(question: BfclQuestion, calls: list[Any]) -> list[Call]:
    normalised: list[Call] = []
    for call in calls:
        if not isinstance(call, (tuple, list)) or len(call) != 2 or not isinstance(call[0], str):
            raise _Fail(f"a call must be a (name, arguments) pair, got {call!r}", "bad_format")
        name, arguments = call
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise _Fail(f"arguments of {name!r} are not JSON: {error}", "bad_format") from error
        if not isinstance(arguments, dict):
            raise _Fail(
                f"arguments of {name!r} must be an object, got {type(arguments).__name__}", "bad_format"
            )
        normalised.append((from_tool_name(name, question.functions), arguments))
    return normalised


def check(question: BfclQuestion, answer: BfclAnswer | None, calls: list[Call]) -> CheckResult:
    """Whether ``calls`` (``(function name, arguments)`` pairs, in the order the model made
    them) answer ``question`` correctly under BFCL's rules.

    Names may be BFCL's own (``math.factorial``) or sanitised tool names (``math_factorial``,
    see :func:`selftune.bfcl.data.tool_name`); arguments may be a dict or a JSON string.
    ``answer`` is required for the AST categories and ignored for (ir)relevance ones.
    """
    kind = category_kind(question.category)
    if kind == "irrelevance":
        if calls:
            error = f"made {len(calls)} call(s) where none was wanted"
            return CheckResult(valid=False, error=error, error_type="irrelevance")
        return CheckResult(valid=True)
    if kind == "relevance":
        if not calls:
            return CheckResult(valid=False, error="made no call where one was wanted", error_type="relevance")
        return CheckResult(valid=True)

    if answer is None:
        raise ValueError(f"{question.id}: category {question.category!r} needs its possible answer")
    if answer.id != question.id:
        raise ValueError(f"answer {answer.id!r} does not belong to question {question.id!r}")
    try:
        _check_ast(question, answer, _normalise_calls(question, calls))
    except _Fail as failure:
        return CheckResult(valid=False, error=failure.error, error_type=failure.error_type)
    return CheckResult(valid=True)


# --- reference calls ----------------------------------------------------------------------


def _materialise(value: Any) -> Any:
    """A concrete value from an acceptable value: nested dicts of acceptable lists (BFCL's
    form for dict parameters) become dicts of their first acceptable value, ``""`` keys dropped."""
    if isinstance(value, dict):
        out = {}
        for key, options in value.items():
            options = _as_list(options)
            if not options or options[0] == _OPTIONAL:
                continue
            out[key] = _materialise(options[0])
        return out
    if isinstance(value, list):
        return [_materialise(item) if isinstance(item, dict) else item for item in value]
    return value


def gold_calls(question: BfclQuestion, answer: BfclAnswer) -> list[Call]:
    """One correct answer as calls: the first acceptable value of every parameter; a parameter
    is omitted when that first value is ``""`` or the function does not declare it, provided
    it is not required and ``""`` is acceptable (else its first other value is used).

    A handful of shipped entries have no correct answer at all (an empty acceptable list, a
    required parameter the answer does not list, or a listed one the function does not
    declare and that may not be omitted); their gold calls fail.
    """
    docs = {function["name"]: function.get("parameters", {}) for function in question.functions}
    calls: list[Call] = []
    for expected in answer.ground_truth:
        name, params = next(iter(expected.items()))
        declared = docs.get(name, {}).get("properties", {})
        required = set(docs.get(name, {}).get("required", []))
        arguments: dict[str, Any] = {}
        for param, options in params.items():
            options = _as_list(options)
            if not options:
                continue
            choice = options[0]
            if choice == _OPTIONAL or param not in declared:
                # Omit it where that is allowed; a required parameter whose only acceptable
                # value is "" gets the empty string, which BFCL's string check accepts.
                others = [option for option in options if option != _OPTIONAL]
                if param not in required and _OPTIONAL in options:
                    continue
                choice = others[0] if others else _OPTIONAL
            arguments[param] = _materialise(choice)
        calls.append((name, arguments))
    return calls
