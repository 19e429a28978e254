"""`python -m mpisage.tools.config_reference > docs/config_reference.md` writes the full configuration reference,
generated from the schema in mpisage.config: every key (nested dataclasses become dotted sections), its type, its
default and the comment written beside it in the source; `--check` exits 1 when docs/config_reference.md differs.

The comments are read from the source with `tokenize`, so the reference says exactly what the schema says: a
comment on the field's line (and the indented continuation lines under it), or the comment lines just above it."""
from __future__ import annotations

import dataclasses
import inspect
import io
import os
import sys
import tokenize
import typing

from mpisage import config as config_module

OUTPUT = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "config_reference.md")


def field_comments(cls) -> dict[str, str]:
    """{field name: its comment} for one dataclass, from its source."""
    lines, _ = inspect.getsourcelines(cls)
    comments: dict[int, str] = {}         # line number (0-based in `lines`) -> comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        row = tok.start[0] - 1
        if tok.type == tokenize.COMMENT:
            comments[row] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(row)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for row, line in enumerate(lines):
        name = line.strip().split(":", 1)[0]
        if name not in names or row not in code_lines or not line.startswith("    ") or line.startswith("     "):
            continue
        text = []
        above = row - 1               # comment-only lines just above (that are not a section's heading comment)
        block = []
        while above >= 0 and above in comments and above not in code_lines:
            block.insert(0, comments[above])
            above -= 1
        if block and (above < 0 or lines[above].strip()):   # a blank line above the block: it heads a section
            text.extend(block)
        if row in comments:
            text.append(comments[row])
            below = row + 1           # continuation: comment-only lines indented past the field's start
            while below in comments and below not in code_lines and lines[below].startswith(" " * 8):
                text.append(comments[below])
                below += 1
        out[name] = " ".join(text)
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " \\| ".join(repr(a).replace("'", "") for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return "null" if f.default is None else f"`{f.default}`"
    return ""


def sections(cls, prefix: str = ""):
    """Yields (section name, docstring, rows) for `cls` and, after it, every nested dataclass, depth first."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((tp, f"{prefix}{f.name}."))
            continue
        rows.append((f"{prefix}{f.name}", _type_name(tp), _default(f), comments.get(f.name, "")))
    doc = inspect.getdoc(cls) if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
    yield prefix.rstrip(".") or "(top level)", doc, rows
    for tp, sub in nested:
        yield from sections(tp, sub)


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from the schema in `mpisage/config.py` by `python -m mpisage.tools.config_reference > "
           "docs/config_reference.md`; do not edit by hand (a test compares the two). Set a key in a YAML file "
           "(`-c FILE`) or as `key=value` on the command line; `python -m mpisage.run --print-config [-c FILE] "
           "[key=value ...]` shows the resolved result. How the keys are used: [configuration.md](configuration.md).",
           ""]
    for name, doc, rows in sections(config_module.Config):
        if not rows:
            continue
        out += [f"## {name}", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{key}` | {tp} | {default} | {text.replace('|', chr(92) + '|')} |"
                for key, tp, default, text in rows]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        try:
            with open(OUTPUT) as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            sys.stderr.write("docs/config_reference.md is out of date with mpisage/config.py; regenerate it: "
                             "python -m mpisage.tools.config_reference > docs/config_reference.md\n")
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
