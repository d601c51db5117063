"""Numeric options that would mean nothing are refused on the command line: one line, exit 2, before any work.

Each command runs as a real ``xnai`` subprocess with no Redis at all: the refusal comes before anything connects
(otherwise the exit code would be 6, broker unreachable).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xnai_tasks.settings import Settings

from support import run_xnai

TIMEOUT = "argument --timeout: "
AT_LEAST_1 = ": must be at least 1, not "


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a wait of no time, of negative time, or of no finite time
        (["submit", "grok", "echo", "--wait", "--timeout", "0"], TIMEOUT + "must be more than 0, not '0'"),
        (["submit", "grok", "echo", "--wait", "--timeout", "-3"], TIMEOUT + "must be more than 0, not '-3'"),
        (["submit", "grok", "echo", "--timeout=-0.5"], TIMEOUT + "must be more than 0, not '-0.5'"),
        (["submit", "grok", "echo", "--timeout", "nan"], TIMEOUT + "must be a finite number, not 'nan'"),
        (["submit", "grok", "echo", "--timeout", "inf"], TIMEOUT + "must be a finite number, not 'inf'"),
        # pool processes, dead letters shown, benchmark sizes: at least one
        (["worker", "grok", "--concurrency", "0"], "argument --concurrency/-c" + AT_LEAST_1 + "'0'"),
        (["worker", "grok", "-c", "-2"], "argument --concurrency/-c" + AT_LEAST_1 + "'-2'"),
        (["status", "--dead-letters", "grok", "--limit", "0"], "argument --limit" + AT_LEAST_1 + "'0'"),
        (["status", "--dead-letters", "grok", "--limit", "-5"], "argument --limit" + AT_LEAST_1 + "'-5'"),
        (["bench", "roundtrip", "--tasks", "0"], "argument --tasks" + AT_LEAST_1 + "'0'"),
        (["bench", "roundtrip", "--rounds", "0"], "argument --rounds" + AT_LEAST_1 + "'0'"),
        (["bench", "roundtrip", "--concurrency", "-1"], "argument --concurrency" + AT_LEAST_1 + "'-1'"),
        (["bench", "llm", "--tokens", "0"], "argument --tokens" + AT_LEAST_1 + "'0'"),
        (["bench", "llm", "--threads", "0"], "argument --threads" + AT_LEAST_1 + "'0'"),
        (["bench", "embed", "--texts", "0"], "argument --texts" + AT_LEAST_1 + "'0'"),
        # not a number at all: argparse's words, as before
        (["submit", "grok", "echo", "--timeout", "soon"], TIMEOUT + "invalid float value: 'soon'"),
    ],
)
def test_a_nonsense_number_is_one_line_and_exit_2(home: Path, args: list[str], message: str) -> None:
    # Given no Redis at all (the embedded one is not running)
    settings = Settings(home=home)
    # When a command is given a number that means nothing
    done = run_xnai(args, settings, timeout=60)
    # Then it is refused on the command line in one line naming the option, exit 2, and nothing ran
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert done.stderr.splitlines() == [f"xnai {args[0]}: {message}"]
    assert done.stdout == ""
