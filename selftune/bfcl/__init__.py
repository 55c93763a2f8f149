"""Berkeley Function Calling Leaderboard (BFCL): its data, read from the ``bfcl-eval`` wheel,
and its AST-checker scoring rules."""

from selftune.bfcl.checker import CheckResult, check, gold_calls, normalize_string
from selftune.bfcl.data import (
    AST_CATEGORIES,
    BFCL_EVAL_VERSION,
    CATEGORIES,
    BfclAnswer,
    BfclDataMissing,
    BfclMessage,
    BfclQuestion,
    category_kind,
    data_dir,
    from_tool_name,
    load_category,
    to_json_schema,
    to_tool,
    tool_name,
    tool_name_map,
)

__all__ = [
    "AST_CATEGORIES",
    "BFCL_EVAL_VERSION",
    "CATEGORIES",
    "BfclAnswer",
    "BfclDataMissing",
    "BfclMessage",
    "BfclQuestion",
    "CheckResult",
    "category_kind",
    "check",
    "data_dir",
    "from_tool_name",
    "gold_calls",
    "load_category",
    "normalize_string",
    "to_json_schema",
    "to_tool",
    "tool_name",
    "tool_name_map",
]
