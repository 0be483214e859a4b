"""The docs' examples as tests/docs/test_examples.py sees them (no root, no lab): every shell block
of README.md and docs/ is either run, or marked with the reason it cannot run here; every
placeholder of a command that runs has a fill-in; no command hides in a block without a language."""

from __future__ import annotations

import re

import pytest

from tests.docs.examples import (
    MARK,
    Block,
    all_blocks,
    blocks,
    documented_json,
    documents,
    strip_comment,
)
from tests.docs.fill import Servers, fill, unfilled

SERVERS = Servers(aggregator="127.0.0.1:1", otlp_http="127.0.0.1:2", otlp_grpc="127.0.0.1:3",
                  clickhouse_url="clickhouse://127.0.0.1:4/db?cluster=ew",
                  nats_url="nats://127.0.0.1:5", ca_file="/tmp/ca.pem", free_port=lambda: 6)
ALL = all_blocks()


def test_the_docs_have_examples_and_the_extractor_finds_them():
    runnable = [c for b in ALL if b.is_example and not b.mark for c in b.commands]
    assert len(runnable) >= 40, len(runnable)
    assert any(b.doc == "README.md" for b in ALL if b.is_example)


@pytest.mark.parametrize("block", [b for b in ALL if b.is_example], ids=lambda b: b.id)
def test_every_shell_block_runs_or_says_why_not(block: Block):
    if block.mark == "skip":
        assert re.search(r"\bneeds\b", block.reason), \
            f"{block.id}: a skip marker names what is missing here ('needs ...'): {block.reason!r}"
        return
    assert block.mark in ("", "synopsis"), f"{block.id}: `{block.mark}` marks JSON answers only"
    assert block.commands, f"{block.id}: a shell block with no command"
    if block.mark == "synopsis":
        return
    for c in block.commands:
        filled = strip_comment(fill(c.text, SERVERS))
        assert not unfilled(filled), f"{block.doc}:{c.line}: `{filled}` keeps {unfilled(filled)}"


def test_no_command_hides_in_a_block_without_a_shell_language():
    for b in ALL:
        if b.is_example or b.lang in ("json", "yaml", "xml"):
            continue
        hidden = [x for x in b.text.splitlines() if re.match(r"\s*(\$ )?(eastwest|make|curl) ", x)]
        assert not hidden, f"{b.id}: a ```{b.lang} block holds commands ({hidden[:2]}): use ```sh"


def test_every_marker_is_understood_and_stands_before_a_block():
    for path in documents():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.lstrip().startswith("<!-- example"):
                continue
            where = f"{path.name}:{i + 1}"
            assert MARK.match(line.strip()), f"{where}: unknown marker {line.strip()!r}"
            assert i + 1 < len(lines) and lines[i + 1].startswith("```"), \
                f"{where}: a marker goes on the line just before a code block's fence"


@pytest.mark.parametrize("block", [b for b in ALL if b.mark == "response"] or [None],
                         ids=lambda b: b.id if b else "none")
def test_response_blocks_are_json_of_a_read_route(block: Block | None):
    if block is None:
        pytest.fail("no JSON answer of the API is marked `response` (docs/api.md shows several)")
    method, _, path = block.reason.partition(" ")
    assert method == "GET" and path.startswith("/api/v1/"), block.reason
    assert isinstance(documented_json(block), dict)


def test_fill_ins():
    assert fill("eastwest aggregator --listen 127.0.0.1:8470 --data ./data", SERVERS) == \
        "eastwest aggregator --listen 127.0.0.1:6 --data ./data"
    assert fill("eastwest collector --aggregator http://127.0.0.1:8470", SERVERS) == \
        "eastwest collector --aggregator http://127.0.0.1:1"
    assert fill("eastwest aggregator ... --otlp-endpoint http://tempo:4318", SERVERS) == \
        "eastwest aggregator --listen 127.0.0.1:6 --data ./data --otlp-endpoint http://127.0.0.1:2"
    assert fill("eastwest collector --stdout --duration 60 > r.jsonl", SERVERS) == \
        "eastwest collector --stdout --duration 6 > r.jsonl"
    assert fill("eastwest lab traffic --duration 5", SERVERS).endswith("--duration 5")
    assert unfilled("eastwest aggregator ... --otlp-endpoint http://tempo:4318")


def test_commands_join_continuations_and_keep_console_output(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n<!-- example: skip needs a thing -->\n```sh\n# comment\n"
                  "eastwest a \\\n    --b c   # says\n\neastwest d\n```\n\n```console\n"
                  "$ eastwest e\nline 1\n\nline 2\n$ eastwest f\n```\n")
    import tests.docs.examples as ex

    old = ex.REPO
    ex.REPO = tmp_path
    try:
        got = blocks(md)
    finally:
        ex.REPO = old
    assert [(b.lang, b.mark, b.reason) for b in got] == [("sh", "skip", "needs a thing"),
                                                       ("console", "", "")]
    assert [(c.line, c.text) for c in got[0].commands] == [(5, "eastwest a --b c   # says"),
                                                           (8, "eastwest d")]
    assert [(c.text, c.output) for c in got[1].commands] == [
        ("eastwest e", ("line 1", "", "line 2")), ("eastwest f", ())]
    assert strip_comment("eastwest a --b 'x # y'  # z") == "eastwest a --b 'x # y'"


def test_every_output_shape_applies_to_a_documented_command():
    """A shape check whose pattern matches no command of the docs would check nothing."""
    from tests.docs.test_examples import SHAPES

    commands = [strip_comment(fill(c.text, SERVERS)) for b in ALL if b.is_example
                for c in b.commands]
    for pattern, _ in SHAPES:
        assert any(re.search(pattern, c) for c in commands), f"no documented command matches {pattern}"
