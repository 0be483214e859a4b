"""`eastwest completion bash|zsh`: a shell completion script, generated from the parser itself.

In:  the `eastwest` argparse tree (every subcommand, nested ones such as `lab up`, their options,
     the choices of options such as `-o`, which options take a file).
Out: a bash script (`complete -F _eastwest eastwest`); for zsh the same function under zsh's
     `bashcompinit`. A new flag is completed as soon as it is declared: nothing to keep in step.

Workload flags (`--to-workload` ...) complete with the names the aggregator knows, from
`eastwest workloads -o names --timeout 2` (silent when none is reachable). Those names are
untrusted: the script reads them line by line into COMPREPLY, never through `compgen -W`,
which would expand `$(...)` inside a name (bash manual, "Programmable Completion Builtins").
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

from eastwest.filters import OBSERVERS, OUTCOMES
from eastwest.record import PROTOCOLS

SHELLS = ("bash", "zsh")
# filter dimensions whose values are a closed set (validated by eastwest.filters, not argparse,
# so that `--protocol TCP` is accepted)
DIMENSION_CHOICES = {"outcome": list(OUTCOMES), "observer": list(OBSERVERS),
                     "protocol": sorted(PROTOCOLS)}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "completion", help="shell completion script for bash or zsh",
        description="Print a completion script for the eastwest command.",
        epilog="examples:\n"
        "  eastwest completion bash > /etc/bash_completion.d/eastwest\n"
        "  source <(eastwest completion bash)            this shell only\n"
        "  eastwest completion zsh > \"${fpath[1]}/_eastwest\"   (or source it from ~/.zshrc)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eastwest.cli import build_parser

    sys.stdout.write(script(build_parser(), args.shell))
    return 0


@dataclass
class Node:
    path: str  # " flows", " lab up"
    words: list[str] = field(default_factory=list)  # options and subcommands
    subcommands: list[str] = field(default_factory=list)
    valued: list[str] = field(default_factory=list)  # options taking a value
    choices: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    workloads: list[str] = field(default_factory=list)


def walk(parser: argparse.ArgumentParser, path: str = "") -> list[Node]:
    node = Node(path)
    nodes = [node]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                node.subcommands.append(name)
                nodes += walk(sub, f"{path} {name}")
            continue
        if action.help == argparse.SUPPRESS:
            continue
        opts = list(action.option_strings)
        if not opts:
            if action.choices:  # a positional with choices, e.g. `completion bash`
                node.words += [str(c) for c in action.choices]
            continue
        node.words += opts
        if action.nargs == 0:
            continue
        node.valued += opts
        meta = str(action.metavar or action.dest).upper()
        choices = action.choices or DIMENSION_CHOICES.get(str(getattr(action, "dimension", "")))
        if choices:
            for o in opts:
                node.choices[o] = [str(c) for c in choices]
        elif "workload" in str(getattr(action, "dimension", "")):
            node.workloads += opts
        elif meta in ("FILE", "DIR") or action.dest.endswith(("_file", "_dir")):
            node.files += opts
    node.words += node.subcommands
    return nodes


def _case_items(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"        {pattern}) {body};;\n" for pattern, body in pairs)


def _q(*words: str) -> str:
    return " ".join(shlex.quote(w) for w in words)


def bash_script(parser: argparse.ArgumentParser) -> str:
    nodes = walk(parser)
    descend = [(_q(f"{n.path}|{s}"), f'path={shlex.quote(f"{n.path} {s}")}')
               for n in nodes for s in n.subcommands]
    skip = [("|".join(_q(f"{n.path}|{o}") for o in n.valued), "skip=1") for n in nodes if n.valued]
    values: list[tuple[str, str]] = []
    for n in nodes:
        for o, ch in n.choices.items():
            values.append((_q(f"{n.path}|{o}"), f'_eastwest_words {_q(*ch)}; return'))
        if n.files:
            values.append(("|".join(_q(f"{n.path}|{o}") for o in n.files),
                           'compopt -o filenames 2>/dev/null; '
                           'COMPREPLY=($(compgen -f -- "$cur")); return'))
        if n.workloads:
            values.append(("|".join(_q(f"{n.path}|{o}") for o in n.workloads),
                           "_eastwest_workloads; return"))
        rest = [o for o in n.valued if o not in n.choices and o not in n.files
                and o not in n.workloads]
        if rest:
            values.append(("|".join(_q(f"{n.path}|{o}") for o in rest), "return"))
    words = [(_q(n.path), f"_eastwest_words {_q(*n.words)}") for n in nodes]
    return f"""\
# bash completion for eastwest; generated by `eastwest completion bash`
_eastwest_words() {{
    local w
    COMPREPLY=()
    for w in "$@"; do [[ $w == "$cur"* ]] && COMPREPLY+=("$w"); done
}}
_eastwest_workloads() {{
    local n
    COMPREPLY=()
    while IFS= read -r n; do
        [[ -n $n && $n == "$cur"* ]] && COMPREPLY+=("$n")
    done < <("${{COMP_WORDS[0]}}" workloads -o names --timeout 2 2>/dev/null)
}}
_eastwest() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="" w i skip=0
    ((COMP_CWORD > 0)) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        if ((skip)); then skip=0; continue; fi
        case "$path|$w" in
{_case_items(descend + skip)}        esac
    done
    if ((skip)); then
        case "$path|$prev" in
{_case_items(values)}        esac
        return
    fi
    case "$path" in
{_case_items(words)}    esac
}}
complete -F _eastwest eastwest
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    body = bash_script(parser)
    if shell == "bash":
        return body
    return ("#compdef eastwest\n# zsh completion for eastwest; generated by "
            "`eastwest completion zsh` (runs the bash completion under bashcompinit)\n"
            "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
            + body)
