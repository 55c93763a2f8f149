"""``calculator``: safe arithmetic by walking the expression's AST (no eval/exec).

Only numbers, ``+ - * / // % **``, unary ``+``/``-``, parentheses and a short
whitelist of math functions and constants are accepted. Expression length,
integer exponents and integer result sizes are capped so no input can make the
tool do unbounded work.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

__all__ = ["CalculatorInput", "CalculatorTool", "evaluate", "format_number", "MAX_EXPRESSION_CHARS"]

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 10_000
MAX_INT_BITS = 10_000
MAX_ROUND_DIGITS = 100
_EXACT_FLOAT_LIMIT = 1e15  # integral floats below this print without ".0"

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "log": math.log, "log10": math.log10, "exp": math.exp,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "floor": math.floor,
    "ceil": math.ceil, "abs": abs, "round": round, "min": min, "max": max,
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}


class CalculatorInput(BaseModel):
    expression: str = Field(
        description="Arithmetic expression, e.g. '17*23+4' or 'sqrt(2)*pi'. Use ** for powers.",
    )


def _check_int(value: Number) -> Number:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolException(f"result is too large (over {MAX_INT_BITS} bits)")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolException(f"exponent {exponent} is too large (limit {MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if (base.bit_length() - 1) * exponent > MAX_INT_BITS:
            raise ToolException(f"result is too large (over {MAX_INT_BITS} bits)")
    result = base**exponent
    if isinstance(result, complex):
        raise ToolException("result is a complex number, which is not supported")
    return result


def _call(name: str, args: list[Number]) -> Number:
    if name == "round" and len(args) == 2 and not (
        isinstance(args[1], int) and abs(args[1]) <= MAX_ROUND_DIGITS
    ):
        raise ToolException(f"round() digits must be an integer between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
    return _FUNCTIONS[name](*args)


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ToolException(f"{node.value!r} is not a number")
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _check_int(_power(left, right))
        if type(node.op) in _BINARY:
            return _check_int(_BINARY[type(node.op)](left, right))
        hint = " (use ** for powers)" if isinstance(node.op, ast.BitXor) else ""
        raise ToolException(f"operator {type(node.op).__name__} is not supported{hint}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ToolException(f"unknown name {node.id!r}; allowed constants: {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise ToolException(f"only these functions can be called: {', '.join(_FUNCTIONS)}")
        if node.keywords:
            raise ToolException("keyword arguments are not supported")
        return _check_int(_call(node.func.id, [_eval(arg) for arg in node.args]))
    raise ToolException(f"unsupported syntax: {type(node).__name__}")


def format_number(value: Number) -> str:
    """Text of a result: integral values without '.0', other floats as repr."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolException("result is not a finite number")
        if value.is_integer() and abs(value) < _EXACT_FLOAT_LIMIT:
            return str(int(value))
    return repr(value)


def evaluate(expression: str) -> str:
    """Evaluate ``expression`` safely; raise ToolException explaining any refusal or math error."""
    text = expression.strip()
    if not text:
        raise ToolException("expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolException(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise ToolException(f"invalid expression: {getattr(error, 'msg', error)}") from None
    try:
        return format_number(_eval(tree.body))
    except ZeroDivisionError:
        raise ToolException("division by zero") from None
    except (ArithmeticError, ValueError, TypeError, RecursionError) as error:
        raise ToolException(f"cannot evaluate: {error}") from None


class CalculatorTool(BaseTool):
    """Evaluate an arithmetic expression."""

    name: str = "calculator"
    description: str = (
        "Evaluate an arithmetic expression exactly. Supports + - * / // % ** and parentheses, "
        "functions sqrt log log10 exp sin cos tan floor ceil abs round min max, constants pi e."
    )
    args_schema: type[BaseModel] = CalculatorInput

    def _run(self, expression: str) -> str:
        return evaluate(expression)
