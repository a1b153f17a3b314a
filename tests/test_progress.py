"""Progress display: items and blocks of items, logged as a few lines when not on a terminal."""

import logging

from patchcore.progress import PROGRESS_ENVIRONMENT_VARIABLE, track, track_blocks


def test_blocks_cover_the_total_and_progress_counts_items(monkeypatch, caplog):
    monkeypatch.setenv(PROGRESS_ENVIRONMENT_VARIABLE, "0")
    with caplog.at_level(logging.INFO, logger="patchcore.progress"):
        assert list(track_blocks(10, 3, "Selecting")) == [3, 6, 9, 10]
        assert list(track_blocks(9, 3, "Even")) == [3, 6, 9]
        assert list(track(["a", "b"], "Listing", unit="file")) == ["a", "b"]
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("Selecting: 10 it in ") for message in messages), messages
    assert any(message.startswith("Even: 9 it in ") for message in messages), messages
    assert any(message.startswith("Listing: 2 file in ") for message in messages), messages


def test_stopping_early_logs_nothing_more(monkeypatch, caplog):
    monkeypatch.setenv(PROGRESS_ENVIRONMENT_VARIABLE, "0")
    with caplog.at_level(logging.INFO, logger="patchcore.progress"):
        for end in track_blocks(100, 10, "Stopped"):
            if end == 30:
                break
    assert not caplog.records  # no final line claiming the whole total
