"""Check (and fix) the parts of `terraform fmt` style that matter for review.

No terraform binary is available where the tests run, so this re-implements the
two rules of hclwrite's formatter that hand-written HCL most often breaks:

1. Indentation: two spaces per nesting level, where a line that opens brackets
   adds one level however many it opens (``toset([`` then ``])``).
2. Alignment: in a run of consecutive single-line attributes at the same level
   (no blank line, comment, block or multi-line value in between), the ``=``
   signs line up one space after the longest name, with one space after ``=``.

Plus: no tabs, no trailing whitespace, one final newline. Heredoc bodies are
left alone. Usage::

    python tools/tf_style.py terraform            # check, exit 1 on problems
    python tools/tf_style.py --write terraform    # rewrite files in place
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

OPEN = "([{"
CLOSE = ")]}"
HEREDOC_START = re.compile(r"<<-?([A-Za-z_][A-Za-z0-9_]*)\s*$")


@dataclass
class Line:
    number: int  # 1-based
    text: str
    code: str  # the line without its comment, strings blanked out
    depth: int  # nesting level the line should be indented to
    single_line: bool  # opens and closes nothing across lines
    in_heredoc: bool


def _scan(code_line: str) -> tuple[str, bool]:
    """Blank out string contents and drop comments; returns (code, ends_in_string)."""
    out = []
    i = 0
    in_string = False
    while i < len(code_line):
        ch = code_line[i]
        if in_string:
            if ch == "\\":
                out.append("  ")
                i += 2
                continue
            if ch == '"':
                in_string = False
                out.append('"')
            else:
                out.append(" ")
            i += 1
            continue
        if ch == '"':
            in_string = True
            out.append('"')
        elif ch == "#" or code_line.startswith("//", i):
            break
        else:
            out.append(ch)
        i += 1
    return "".join(out), in_string


def analyse(text: str) -> list[Line]:
    lines: list[Line] = []
    stack: list[int] = []  # open brackets left by each still-open opener line
    heredoc_end: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        if heredoc_end is not None:
            lines.append(Line(number, raw, "", len(stack), True, True))
            if raw.strip() == heredoc_end:
                heredoc_end = None
            continue
        code, _ = _scan(raw)
        stripped = code.strip()
        line_opens = 0
        depth = None
        touched_stack = False
        for ch in stripped:
            if ch in CLOSE:
                if line_opens > 0:
                    line_opens -= 1
                elif stack:
                    touched_stack = True
                    stack[-1] -= 1
                    if stack[-1] == 0:
                        stack.pop()
                continue
            if depth is None:
                depth = len(stack)
            if ch in OPEN:
                line_opens += 1
        if depth is None:
            depth = len(stack)
        if line_opens:
            stack.append(line_opens)
        match = HEREDOC_START.search(code.rstrip())
        if match:
            heredoc_end = match.group(1)
        lines.append(
            Line(
                number, raw, code, depth, not line_opens and not touched_stack and not match, False
            )
        )
    return lines


def _assign_column(code: str) -> int | None:
    """Index of the attribute's '=' (not ==, !=, <=, >=, =>), outside brackets."""
    level = 0
    for i, ch in enumerate(code):
        if ch in OPEN:
            level += 1
        elif ch in CLOSE:
            level -= 1
        elif ch == "=" and level == 0:
            before = code[i - 1] if i else ""
            after = code[i + 1] if i + 1 < len(code) else ""
            if before in "=!<>" or after in "=>":
                continue
            return i
    return None


def _is_attribute(line: Line) -> bool:
    if line.in_heredoc or not line.code.strip():
        return False
    column = _assign_column(line.code)
    if column is None:
        return False
    key = line.text[:column].strip()  # blanking strings keeps columns in place
    return bool(re.fullmatch(r'"[^"]*"|[A-Za-z_][A-Za-z0-9_\-]*', key))


def _chains(lines: list[Line]) -> list[list[Line]]:
    chains: list[list[Line]] = []
    current: list[Line] = []
    for line in lines:
        if _is_attribute(line) and line.single_line:
            if current and current[-1].depth != line.depth:
                chains.append(current)
                current = []
            current.append(line)
        else:
            if current:
                chains.append(current)
            current = []
    if current:
        chains.append(current)
    return chains


def _aligned(line: Line, key_width: int) -> str:
    column = _assign_column(line.code)
    assert column is not None
    key = line.text[:column].strip()
    value = line.text[column + 1 :].strip()
    return " " * (2 * line.depth) + key.ljust(key_width) + " = " + value


def check(text: str, name: str = "<text>") -> list[str]:
    problems = []
    if "\t" in text:
        problems.append(f"{name}: contains a tab")
    if not text.endswith("\n") or text.endswith("\n\n"):
        problems.append(f"{name}: must end with exactly one newline")
    lines = analyse(text)
    for line in lines:
        if line.in_heredoc:
            continue
        if line.text != line.text.rstrip():
            problems.append(f"{name}:{line.number}: trailing whitespace")
        if line.text.strip():
            indent = len(line.text) - len(line.text.lstrip(" "))
            if indent != 2 * line.depth:
                problems.append(
                    f"{name}:{line.number}: indented {indent} spaces, expected {2 * line.depth}"
                )
    for chain in _chains(lines):
        width = max(len(line.text[: _assign_column(line.code)].strip()) for line in chain)
        for line in chain:
            if line.text.rstrip() != _aligned(line, width):
                problems.append(
                    f"{name}:{line.number}: '=' not aligned with its neighbours "
                    f"(lines {chain[0].number}-{chain[-1].number})"
                )
    return problems


def fix(text: str) -> str:
    lines = analyse(text)
    out = [line.text for line in lines]
    for line in lines:
        if not line.in_heredoc and line.text.strip():
            out[line.number - 1] = " " * (2 * line.depth) + line.text.strip()
        elif not line.in_heredoc:
            out[line.number - 1] = ""
    # Re-analyse so alignment sees the new indentation.
    lines = analyse("\n".join(out))
    for chain in _chains(lines):
        width = max(len(line.text[: _assign_column(line.code)].strip()) for line in chain)
        for line in chain:
            out[line.number - 1] = _aligned(line, width)
    return "\n".join(out).rstrip("\n") + "\n"


def tf_files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(path.rglob("*.tf")) if path.is_dir() else [path])
    return [p for p in found if ".terraform" not in p.parts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--write", action="store_true", help="rewrite files in place")
    args = parser.parse_args(argv)
    status = 0
    for path in tf_files(args.paths):
        text = path.read_text()
        if args.write:
            fixed = fix(text)
            if fixed != text:
                path.write_text(fixed)
                sys.stderr.write(f"rewrote {path}\n")
        else:
            for problem in check(text, str(path)):
                sys.stderr.write(problem + "\n")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
