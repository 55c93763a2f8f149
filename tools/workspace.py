"""File tools confined to one workspace directory: ``read_file``, ``write_file``, ``list_files``.

Every path is resolved (following symlinks) and must stay inside the resolved
workspace root, so ``..``, absolute paths elsewhere and symlinks pointing out
are all refused. Reads and writes are capped at ``max_file_bytes``.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, Field

__all__ = [
    "ReadFileInput", "WriteFileInput", "ListFilesInput",
    "ReadFileTool", "WriteFileTool", "ListFilesTool", "MAX_LIST_ENTRIES",
]

MAX_LIST_ENTRIES = 200


class ReadFileInput(BaseModel):
    path: str = Field(description="File path relative to the workspace, e.g. 'notes/todo.txt'.")


class WriteFileInput(BaseModel):
    path: str = Field(description="File path relative to the workspace; missing folders are created.")
    content: str = Field(description="Full text to write; replaces any existing content.")


class ListFilesInput(BaseModel):
    path: str = Field(".", description="Folder relative to the workspace; '.' is the workspace itself.")


class _WorkspaceTool(BaseTool):
    """Shared path confinement for the file tools."""

    root: Path
    max_file_bytes: int = 1_000_000

    def _resolve(self, path: str) -> Path:
        """Absolute, symlink-free path for ``path``; ToolException if it leaves the workspace."""
        if ".." in PurePath(path).parts:
            raise ToolException(f"path {path!r} is not allowed: '..' may not be used")
        root = self.root.resolve()
        try:
            resolved = (root / path).resolve()
        except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: symlink loop
            raise ToolException(f"invalid path {path!r}: {error}") from None
        if not resolved.is_relative_to(root):
            raise ToolException(f"path {path!r} is outside the workspace")
        return resolved


class ReadFileTool(_WorkspaceTool):
    """Read a text file from the workspace."""

    name: str = "read_file"
    description: str = "Read a text file from the workspace and return its content."
    args_schema: type[BaseModel] = ReadFileInput

    def _run(self, path: str) -> str:
        target = self._resolve(path)
        if not target.exists():
            raise ToolException(f"file {path!r} does not exist")
        if target.is_dir():
            raise ToolException(f"{path!r} is a folder; use list_files to see its content")
        if not target.is_file():
            raise ToolException(f"{path!r} is not a regular file")
        try:
            with target.open("rb") as handle:
                data = handle.read(self.max_file_bytes + 1)
        except OSError as error:
            raise ToolException(f"cannot read {path!r}: {error.strerror or error}") from None
        if len(data) > self.max_file_bytes:
            raise ToolException(f"file {path!r} is larger than the limit of {self.max_file_bytes} bytes")
        return data.decode("utf-8", errors="replace")


class WriteFileTool(_WorkspaceTool):
    """Write a text file in the workspace."""

    name: str = "write_file"
    description: str = "Create or overwrite a text file in the workspace with the given content."
    args_schema: type[BaseModel] = WriteFileInput

    def _run(self, path: str, content: str) -> str:
        target = self._resolve(path)
        data = content.encode("utf-8")
        if len(data) > self.max_file_bytes:
            raise ToolException(f"content is {len(data)} bytes, over the limit of {self.max_file_bytes} bytes")
        if target == self.root.resolve() or target.is_dir():
            raise ToolException(f"{path!r} is a folder, not a file")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        except OSError as error:
            raise ToolException(f"cannot write {path!r}: {error.strerror or error}") from None
        return f"wrote {len(data)} bytes to {target.relative_to(self.root.resolve()).as_posix()}"


class ListFilesTool(_WorkspaceTool):
    """List one folder of the workspace."""

    name: str = "list_files"
    description: str = "List the files and folders (marked with a trailing '/') in a workspace folder."
    args_schema: type[BaseModel] = ListFilesInput

    def _run(self, path: str = ".") -> str:
        target = self._resolve(path)
        if target == self.root.resolve() and not target.exists():
            return "(empty folder)"
        if target.is_file():
            raise ToolException(f"{path!r} is a file; use read_file to see its content")
        if not target.is_dir():
            raise ToolException(f"folder {path!r} does not exist")
        try:
            entries = sorted(target.iterdir(), key=lambda entry: entry.name)
        except OSError as error:
            raise ToolException(f"cannot list {path!r}: {error.strerror or error}") from None
        if not entries:
            return "(empty folder)"
        lines = [entry.name + ("/" if entry.is_dir() else "") for entry in entries[:MAX_LIST_ENTRIES]]
        if len(entries) > MAX_LIST_ENTRIES:
            lines.append(f"... and {len(entries) - MAX_LIST_ENTRIES} more")
        return "\n".join(lines)
