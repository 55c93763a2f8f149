"""``python``: run a code snippet in an isolated, resource-limited subprocess.

The child is ``sys.executable -I`` (no user site, no ``PYTHON*`` variables) in a
fresh temporary folder, with an environment holding only a minimal ``PATH`` and
``HOME``, an address-space limit, and a wall-clock timeout after which its whole
process group is killed. This is damage control, not a security sandbox: the
code runs as the same user and can read what that user can read.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

__all__ = ["PythonInput", "PythonTool", "truncate", "MINIMAL_PATH"]

MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
_DRAIN_TIMEOUT_S = 5.0


class PythonInput(BaseModel):
    code: str = Field(
        description="Python source to run as a script. Use print() to show results; each run starts fresh.",
    )


def truncate(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping its head and tail."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - head
    return f"{text[:head]}\n... [{len(text) - limit} characters truncated] ...\n{text[-tail:]}"


def _limit_memory(max_bytes: int) -> Callable[[], None]:
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _decode(data: bytes | None) -> str:
    return (data or b"").decode("utf-8", errors="replace").rstrip("\n")


class PythonTool(BaseTool):
    """Run Python code and report its exit code and output."""

    name: str = "python"
    description: str = (
        "Run a Python 3 script in a fresh temporary folder and return its exit code, stdout and stderr. "
        "Nothing persists between runs; there is no network."
    )
    args_schema: type[BaseModel] = PythonInput
    timeout_s: float = 10.0
    memory_mb: int = 512
    max_output_chars: int = 4000

    def _run(self, code: str) -> str:
        with tempfile.TemporaryDirectory(prefix="selftune-python-") as workdir:
            try:
                process = subprocess.Popen(
                    [sys.executable, "-I", "-"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env={"PATH": MINIMAL_PATH, "HOME": workdir},
                    preexec_fn=_limit_memory(self.memory_mb * 1024 * 1024),
                    start_new_session=True,
                )
            except (OSError, subprocess.SubprocessError) as error:
                raise ToolException(f"cannot start python: {error}") from None
            try:
                stdout, stderr = process.communicate(code.encode("utf-8", errors="replace"), timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                try:
                    stdout, _ = process.communicate(timeout=_DRAIN_TIMEOUT_S)
                except subprocess.TimeoutExpired:  # a detached grandchild still holds the pipes
                    process.kill()
                    process.wait()
                    stdout = b""
                partial = truncate(_decode(stdout), self.max_output_chars)
                raise ToolException(
                    f"timed out after {self.timeout_s:g} seconds; the process was killed. "
                    f"stdout so far:\n{partial}"
                ) from None
        text = f"exit code {process.returncode}\nstdout:\n{truncate(_decode(stdout), self.max_output_chars)}"
        if errors := _decode(stderr):
            text += f"\nstderr:\n{truncate(errors, self.max_output_chars)}"
        return text
