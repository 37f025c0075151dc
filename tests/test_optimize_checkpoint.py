"""Checkpoint files: atomic replacement, fallback to the previous one, refusal of bad files."""

import pytest
import torch

from stages.optimize import checkpoint as ckpt


class Evil:
    """Any class: ``weights_only`` loading must refuse to build it."""


def _state(iteration):
    return {"iteration": iteration, "scene": {"w": torch.full((3,), float(iteration))}}


def test_newest_checkpoint_wins_and_previous_is_kept(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(2))
    ckpt.save_checkpoint(tmp_path, _state(4))
    assert ckpt.load_checkpoint(tmp_path)["iteration"] == 4
    prev = torch.load(tmp_path / ckpt.PREVIOUS_NAME, weights_only=True)
    assert prev["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME])


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(2))
    ckpt.save_checkpoint(tmp_path, _state(4))
    newest = tmp_path / ckpt.CHECKPOINT_NAME
    newest.write_bytes(newest.read_bytes()[:50])  # truncated by a disk problem
    with pytest.warns(UserWarning, match="unreadable"):
        state = ckpt.load_checkpoint(tmp_path)
    assert state["iteration"] == 2 and torch.equal(state["scene"]["w"], torch.full((3,), 2.0))


def test_failed_write_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _state(2))
    before = (tmp_path / ckpt.CHECKPOINT_NAME).read_bytes()

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, _state(4))
    assert (tmp_path / ckpt.CHECKPOINT_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_NAME]  # no temporary leftovers
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path)["iteration"] == 2


def test_foreign_or_pickled_files_are_ignored(tmp_path):
    assert ckpt.load_checkpoint(tmp_path / "none") is None
    torch.save({"something": 1}, tmp_path / ckpt.CHECKPOINT_NAME)
    with pytest.warns(UserWarning, match="not an optimiser checkpoint"):
        assert ckpt.load_checkpoint(tmp_path) is None
    torch.save({"format_version": 1, "iteration": 3, "x": Evil()}, tmp_path / ckpt.CHECKPOINT_NAME)
    with pytest.warns(UserWarning, match="unreadable"):  # weights_only refuses arbitrary objects
        assert ckpt.load_checkpoint(tmp_path) is None
