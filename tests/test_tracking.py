"""metrics.jsonl on resume: lines after the checkpoint go, a torn last line (a kill mid-write) goes with a note."""
import pytest

from common.tracking import truncate_jsonl


def test_truncate_drops_later_steps_and_a_torn_last_line(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "a": 1.0}\n\n{"step": 1, "a": 2.0}\n{"step": 2, "a": 3.0}\n{"step": 3, "a')
    truncate_jsonl(path, 1)
    assert path.read_text() == '{"step": 0, "a": 1.0}\n{"step": 1, "a": 2.0}\n'
    assert "dropped a torn last line" in capsys.readouterr().out
    truncate_jsonl(tmp_path / "missing.jsonl", 1)  # nothing to do


def test_a_malformed_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, oops}\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        truncate_jsonl(path, 5)
