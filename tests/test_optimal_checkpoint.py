"""The one resumable checkpoint (``optimal.checkpoint.Checkpoint``) of estimate and floor."""

import json

import pytest

from lossfloor.errors import ParameterError
from lossfloor.optimal.checkpoint import Checkpoint, checkpoint_key


def test_units_are_saved_as_they_finish_and_read_back_under_the_same_key(tmp_path):
    path, key = tmp_path / "run.partial", checkpoint_key(["options", 1])
    first = Checkpoint.open(path, key, "a test")
    calls = []
    assert first.unit("a", lambda: calls.append("a") or [1.0, 2.0]) == [1.0, 2.0]
    assert json.loads(path.read_text()) == {"key": key, "done": {"a": [1.0, 2.0]}}
    again = Checkpoint.open(path, key, "a test")
    assert again.unit("a", lambda: calls.append("again") or [0.0]) == [1.0, 2.0]
    assert calls == ["a"]
    again.remove()
    assert not path.exists()


def test_another_key_or_a_file_that_is_not_a_checkpoint_is_refused_unless_restart(tmp_path):
    path = tmp_path / "run.partial"
    Checkpoint.open(path, checkpoint_key("mine"), "a test").add("a", 1)
    with pytest.raises(ParameterError, match="other data or options") as exc:
        Checkpoint.open(path, checkpoint_key("other"), "a test")
    assert exc.value.param == "restart"
    assert Checkpoint.open(path, checkpoint_key("other"), "a test", restart=True).done == {}
    path.write_text('{"key": "truncated')
    with pytest.raises(ParameterError, match="is not a checkpoint of a test"):
        Checkpoint.open(path, checkpoint_key("mine"), "a test")


def test_a_process_that_does_not_write_leaves_the_file_alone(tmp_path):
    path = tmp_path / "run.partial"
    reader = Checkpoint.open(path, checkpoint_key("k"), "a test")
    reader.writes = False
    reader.add("a", 1)
    reader.remove()
    assert reader.done == {"a": 1} and not path.exists()
