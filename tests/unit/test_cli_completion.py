"""Shell completion: the generated bash script, run by a real bash, completes subcommands
(nested ones too), flags, closed value sets and files; workload names come from
`eastwest workloads -o names` and are never expanded by the shell."""

from __future__ import annotations

import subprocess

import pytest

from eastwest.cli import build_parser, main
from eastwest.cli.completion import script


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "eastwest.bash"
    path.write_text(script(build_parser(), "bash"))
    return path


def complete(script_path, line: str, command: str = "eastwest") -> list[str]:
    """COMPREPLY for the command line `line` (the cursor at its end)."""
    prog = ('source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");'
            ' COMP_WORDS[0]="$3"; COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _eastwest;'
            ' printf "%s\\n" "${COMPREPLY[@]}"')
    out = subprocess.run(["bash", "--norc", "-c", prog, "_", str(script_path), line, command],
                         capture_output=True, text=True, check=True).stdout
    return [w for w in out.splitlines() if w]


@pytest.mark.parametrize(("line", "expected"), [
    ("eastwest fl", ["flows"]),
    ("eastwest flows --to", ["--to-workload", "--to-ip", "--to-port", "--to-service", "--token",
                             "--token-file"]),
    ("eastwest flows -o ", ["table", "compact", "json", "jsonl", "csv"]),
    ("eastwest flows --outcome re", ["refused", "reset"]),
    ("eastwest flows --not --observer ", ["client", "server", "path", "drops"]),
    ("eastwest flows --outcome dr", ["dropped"]),
    ("eastwest flows --port 80 --pr", ["--protocol", "--print-filter"]),
    ("eastwest flows --port ", []),  # a free value: nothing to offer
    ("eastwest lab up --vxlan-port ", ["4789", "8472"]),
    ("eastwest lab st", ["status"]),
    ("eastwest completion ", ["-h", "--help", "bash", "zsh"]),
])
def test_bash_completes_commands_flags_and_values(bash_script, line, expected):
    assert complete(bash_script, line) == expected


def test_bash_completes_file_flags_with_file_names(bash_script, tmp_path):
    (tmp_path / "records-a.jsonl").write_text("")
    (tmp_path / "records-b.jsonl").write_text("")
    got = complete(bash_script, f"eastwest flows --input-file {tmp_path}/rec")
    assert got == [f"{tmp_path}/records-a.jsonl", f"{tmp_path}/records-b.jsonl"]


def test_workload_names_come_from_the_aggregator_and_are_never_expanded(bash_script, tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "eastwest"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "workloads -o names" ] || exit 3\n'
                    f"printf '%s\\n' db dbproxy 'd$(touch {marker})' api\n")
    fake.chmod(0o755)
    got = complete(bash_script, "eastwest flows --to-workload d", command=str(fake))
    assert got == ["db", "dbproxy", f"d$(touch {marker})"]
    assert not marker.exists()


def test_zsh_script_runs_the_same_function_under_bashcompinit(capsys):
    assert main(["completion", "zsh"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#compdef eastwest\n") and "bashcompinit" in out
    assert "complete -F _eastwest eastwest" in out
    syntax = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
