"""benchmarks.common.run_script: the benchmark scripts' bad input exits 2 with one line, like the CLI."""

from __future__ import annotations

import pytest
from slimsearch.core.errors import SlimError

from benchmarks.common import run_script


def _exit_code(main, capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:  # noqa: ANN001
    with pytest.raises(SystemExit) as e:
        run_script(main)
    return e.value.code, capsys.readouterr().err


def test_a_message_or_slim_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    def bad_flag() -> int:
        raise SystemExit("--models: no checkpoint for 'x'")

    def bad_policy() -> int:
        raise SlimError("policy: layer 'conv9' does not exist")

    assert _exit_code(bad_flag, capsys) == (2, "--models: no checkpoint for 'x'\n")
    assert _exit_code(bad_policy, capsys) == (2, "error: policy: layer 'conv9' does not exist\n")


def test_main_return_codes_and_other_errors_pass_through(capsys: pytest.CaptureFixture[str]) -> None:
    assert _exit_code(lambda: 0, capsys) == (0, "")
    assert _exit_code(lambda: None, capsys) == (0, "")
    assert _exit_code(lambda: 3, capsys) == (3, "")

    def bug() -> int:
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        run_script(bug)
