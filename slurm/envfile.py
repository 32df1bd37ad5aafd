"""Read a pipeline or site file: the `KEY=value` lines of a shell file, parsed, never run.

What a file may hold, as bash would read it: blank lines and `# comments` (also after a value), `KEY=value` with
the value a shell word (unquoted, 'single-quoted', "double-quoted" with \\ escapes, or pieces of these side by side),
`$NAME` / `${NAME}` in unquoted and double-quoted text (a key set earlier in the file, else the environment), and
bash arrays `KEY=(word word ...)`, which may span lines. Anything else (a command, `export`, `$(...)`, a value with
an unquoted space) is refused in one line naming the file and line: the file is data, not a script.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from common.errors import PipelineError

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EnvFileError(PipelineError):
    pass


@dataclass(frozen=True)
class Setting:
    value: str | tuple[str, ...]   # a tuple for a bash array
    line: int


class _Reader:
    def __init__(self, text: str, path: Path, env):
        self.text, self.path, self.env = text, path, env
        self.pos, self.line = 0, 1
        self.values: dict[str, Setting] = {}

    def fail(self, message: str, line: int | None = None):
        raise EnvFileError(f"{self.path} line {line or self.line}: {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        c = self.peek()
        self.pos += 1
        if c == "\n":
            self.line += 1
        return c

    def skip_blanks(self, newlines: bool) -> None:
        while self.peek() in (" ", "\t") or (newlines and self.peek() == "\n") or self.peek() == "#" and (
                self.pos == 0 or self.text[self.pos - 1] in " \t\n("):
            if self.peek() == "#":
                while self.peek() not in ("", "\n"):
                    self.take()
            else:
                self.take()

    def settings(self) -> dict[str, Setting]:
        while True:
            self.skip_blanks(newlines=True)
            if not self.peek():
                return self.values
            line = self.line
            match = KEY.match(self.text, self.pos)
            if not match or self.text[match.end():match.end() + 1] != "=":
                word = self.text[self.pos:].split("\n", 1)[0].strip()
                self.fail(f"not a KEY=value line: {word!r}")
            key = match.group()
            self.pos = match.end() + 1
            if self.peek() == "(":
                self.take()
                items = []
                while True:
                    self.skip_blanks(newlines=True)
                    if self.peek() == ")":
                        self.take()
                        break
                    if not self.peek():
                        self.fail(f"{key}=( has no closing )", line)
                    items.append(self.word())
                value = tuple(items)
            else:
                value = self.word() if self.peek() not in (" ", "\t", "\n", "") else ""
            self.skip_blanks(newlines=False)
            if self.peek() not in ("\n", ""):
                self.fail(f"{key}: more than one word after '=' (quote a value that holds spaces)")
            self.values[key] = Setting(value, line)   # set again: the later line wins, as in the shell

    def word(self) -> str:
        out = []
        while self.peek() not in ("", " ", "\t", "\n", ")"):
            c = self.take()
            if c == "'":
                end = self.text.find("'", self.pos)
                if end < 0:
                    self.fail("a ' is never closed")
                piece = self.text[self.pos:end]
                self.line += piece.count("\n")
                self.pos = end + 1
                out.append(piece)
            elif c == '"':
                out.append(self.double_quoted())
            elif c == "\\":
                nxt = self.take()
                out.append("" if nxt == "\n" else nxt)
            elif c == "$":
                out.append(self.variable())
            elif c in ";&|<>`(":
                self.fail(f"{c!r} in a value: quote it (the file is read as data, not run)")
            else:
                out.append(c)
        return "".join(out)

    def double_quoted(self) -> str:
        out = []
        while True:
            c = self.take()
            if c == "":
                self.fail('a " is never closed')
            if c == '"':
                return "".join(out)
            if c == "\\" and self.peek() in ('"', "\\", "$", "`", "\n"):
                nxt = self.take()
                out.append("" if nxt == "\n" else nxt)
            elif c == "$":
                out.append(self.variable())
            elif c == "`":
                self.fail("` in a value: command substitution is not read (the file is data, not run)")
            else:
                out.append(c)

    def variable(self) -> str:
        if self.peek() == "(":
            self.fail("$(...) in a value: command substitution is not read (the file is data, not run)")
        braced = self.peek() == "{"
        if braced:
            self.take()
        match = KEY.match(self.text, self.pos)
        if not match:
            self.fail("$ must name a variable ($NAME or ${NAME}); write \\$ for a dollar sign")
        name = match.group()
        self.pos = match.end()
        if braced:
            if self.peek() != "}":
                self.fail(f"${{{name}...}}: only plain ${{NAME}} is read")
            self.take()
        if name in self.values:
            value = self.values[name].value
            if isinstance(value, tuple):
                self.fail(f"${name} is an array; name an item's value instead")
            return value
        if name in self.env:
            return self.env[name]
        self.fail(f"${name} is not set (neither earlier in this file nor in the environment)")


def read(path, env=None) -> dict[str, Setting]:
    """{KEY: Setting} of the file, in file order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EnvFileError(f"{path}: not UTF-8 text") from None
    return _Reader(text, path, os.environ if env is None else env).settings()
