"""Local dataset loading: validation errors name the row and the field; the sampler is seeded and resumable."""
import json

import pytest

from common.data import DataError, PromptSampler, load_examples, load_local


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_valid_rows(tmp_path):
    p = write(tmp_path / "d.jsonl", [{"prompt": "1+1?", "answer": "2", "solution": "1+1=2"},
                                     {"prompt": "f", "answer": "x", "task": "code", "tests": ["assert True"]}])
    ex = load_local(p)
    assert [e.answer for e in ex] == ["2", "x"] and ex[0].solution == "1+1=2" and ex[1].tests == ["assert True"]
    assert ex[0].task == "math" and ex[1].task == "code"


@pytest.mark.parametrize("row,needle", [
    ({"answer": "2"}, "line 2: missing required field 'prompt'"),
    ({"prompt": "q"}, "line 2: missing required field 'answer'"),
    ({"prompt": 3, "answer": "2"}, "line 2: field 'prompt' has type int"),
    ({"prompt": "  ", "answer": "2"}, "line 2: field 'prompt' is empty"),
    ({"prompt": "q", "answer": "2", "task": "code"}, "line 2: a code row needs a non-empty 'tests' list"),
    ({"prompt": "q", "answer": "2", "task": "poetry"}, "line 2: field 'task' must be"),
    ({"prompt": "q", "answer": "2", "tests": [1]}, "line 2: field 'tests' must be a list of strings"),
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
])
def test_malformed_row_names_row_and_field(tmp_path, row, needle):
    p = write(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}, row])
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_local(p)


def test_parquet_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match="row 1: missing required field 'answer'"):
        load_local(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="not found"):
        load_local(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="unsupported file type"):
        load_local(write(tmp_path / "d.csv", ["a,b"]))
    with pytest.raises(DataError, match="no rows"):
        load_local(write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(DataError, match="unknown dataset 'nope'.*toy"):
        load_examples("nope")


def test_sampler_seeded_epochs_and_resume():
    items = list(range(5))
    a, b = PromptSampler(items, 3), PromptSampler(items, 3)
    first = a.take(12)
    assert first == b.take(12) and sorted(first[:5]) == items and sorted(first[5:10]) == items
    c = PromptSampler(items, 3)
    c.take(7)
    d = PromptSampler(items, 3)
    d.load_state_dict(c.state_dict())
    assert c.take(6) == d.take(6)
    assert PromptSampler(items, 4).take(5) != first[:5]


def test_model_path_not_found_is_a_clear_error(tmp_path):
    from common.models import load_tokenizer, resolve_model_path

    with pytest.raises(FileNotFoundError, match="model path not found: ./no-such-model"):
        resolve_model_path("./no-such-model")
    with pytest.raises((FileNotFoundError, OSError)):
        load_tokenizer(str(tmp_path / "missing"))
    assert resolve_model_path("toy").endswith("toy-base")
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # a hub id passes through untouched


def test_holdout_split_is_deterministic_disjoint_and_bounded():
    from common.data import Example, holdout_split

    rows = [Example(prompt=f"q{i}", answer=str(i)) for i in range(50)] + [Example(prompt="q7", answer="7")]
    train, held = holdout_split(rows, max_rows=200)
    assert len(held) == 5 and len(train) + len(held) <= len(rows)
    assert not {e.prompt for e in train} & {e.prompt for e in held}  # a duplicated prompt is never on both sides
    assert holdout_split(list(reversed(rows)), 200)[1] == held  # no seed, no dependence on row order
    assert holdout_split(rows, 2)[1] == held[:2]  # --eval-size caps it (a subset of the larger split)
    assert [len(part) for part in holdout_split(rows[:3], 200)] == [2, 1]  # at least one row held out
    assert holdout_split(rows[:1], 200) == (rows[:1], [])  # one distinct prompt: nothing to hold out


def test_local_dataset_without_eval_dataset_holds_out_rows(tiny_model_dir, tmp_path, capsys):
    import grpo
    from common.run import setup

    path = write(tmp_path / "d.jsonl", [{"prompt": f"Compute {i}+1.", "answer": str(i + 1)} for i in range(40)])
    run = setup(grpo.Args(model=str(tiny_model_dir), dataset=str(path), output_dir=str(tmp_path / "r")), "grpo")
    train = {e.prompt for e in run.sampler.examples}
    held = {e.prompt for e in run.eval_set}
    assert len(held) == 4 and len(train) == 36 and not train & held
    assert (f"36 train / 4 eval prompts (0 over-long skipped; eval: 4 of the 40 rows of {path} held out"
            in capsys.readouterr().out)
    run.close()
