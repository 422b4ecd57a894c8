"""The docs' generated references: every command (docs/cli.md) and every config key (docs/config.md), each
between `<!-- generated: NAME -->` and `<!-- end generated -->` markers; a test keeps them equal to the code.
Rewrite them with `python -m ermgap.cli.reference docs/` (`make docs` does it before building the site)."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer

# typer bundles its own click (typer._click, private): parameters and groups are told apart by duck typing.
_METAVARS = {str: "TEXT", int: "INTEGER", float: "NUMBER", Path: "PATH"}


def _is_argument(param) -> bool:
    return param.param_type_name == "argument"


def _flags(param) -> str:
    if _is_argument(param):
        return (param.name or "").upper() + (" ..." if param.nargs == -1 else "")
    names = " / ".join(param.opts + param.secondary_opts)
    if not param.is_flag and param.metavar:
        names += f" {param.metavar}"
    elif not param.is_flag:
        names += f" {_METAVARS.get(param.type_descriptor.annotation, 'VALUE')}"
    return names


def _default(param) -> str:
    if _is_argument(param):
        return "required" if param.required else ""
    value = param.default
    if param.is_flag:
        return "on" if value else "off"
    if value is None or value == () or value == []:
        return ""
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _commands(group, path: tuple[str, ...]):
    """(command path, command) of every leaf command, in the order the CLI lists them."""
    if hasattr(group, "list_commands"):
        ctx = typer.Context(group, info_name=" ".join(path))
        for name in group.list_commands(ctx):
            yield from _commands(group.get_command(ctx, name), (*path, name))
    else:
        yield path, group


def cli_reference_markdown() -> str:
    """Every `ermgap` command: its help text, usage and a table of its arguments and options."""
    from ermgap.cli.main import app

    root = typer.main.get_command(app)
    out: list[str] = []
    for path, cmd in _commands(root, ("ermgap",)):
        name = " ".join(path)
        params = [p for p in cmd.params if p.name != "help" and not getattr(p, "hidden", False)]
        usage = " ".join([name, *(["[OPTIONS]"] if any(not _is_argument(p) for p in params) else []),
                          *(_flags(p) for p in params if _is_argument(p))])
        out += [f"### `{name}`", "", inspect.cleandoc(cmd.help or ""), "", f"```\n{usage}\n```", ""]
        if params:
            out += ["| argument / option | default | what |", "| --- | --- | --- |"]
            out += [f"| `{_flags(p)}` | {_default(p)} | {_cell(getattr(p, 'help', None) or '')} |" for p in params]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def generated_blocks() -> dict[str, tuple[str, str]]:
    """{block name: (docs page, Markdown)} of every generated reference."""
    from ermgap.config import reference_markdown

    return {"cli-reference": ("cli.md", cli_reference_markdown()),
            "config-reference": ("config.md", reference_markdown() + "\n")}


def block(name: str, text: str) -> str:
    return f"<!-- generated: {name} -->\n{text}<!-- end generated -->"


def update_docs(docs_dir: Path) -> list[Path]:
    """Replace each generated block in its page under `docs_dir`; returns the pages that changed."""
    changed = []
    for name, (page, text) in generated_blocks().items():
        path = docs_dir / page
        old = path.read_text(encoding="utf-8")
        start, end = f"<!-- generated: {name} -->", "<!-- end generated -->"
        if start not in old:
            raise SystemExit(f"{path}: no '{start}' marker")
        head, _, rest = old.partition(start)
        new = head + block(name, text) + rest.partition(end)[2]
        if new != old:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    import sys

    for p in update_docs(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(f"updated {p}")
