"""The event history on disk: repeated events are counted, newest first, kept across restarts."""

from __future__ import annotations

from genmlx.master.runtime.events import EventLog


def test_repeats_are_counted_and_history_survives_reopening(tmp_path):
    path = tmp_path / "events.sqlite"
    log = EventLog(path)
    seen = []
    unsubscribe = log.subscribe(seen.append)
    log.record("Model", "qwen", "Warning", "RankExited", "rank 0 exited with code 1")
    log.record("Model", "qwen", "Warning", "RankExited", "rank 0 exited with code 1")
    log.record("Node", "a", "Normal", "AgentReady", "agent at 10.0.0.1:6790 answers")
    unsubscribe()
    log.record("Model", "qwen", "Normal", "Serving", "serving at http://10.0.0.1:8100/v1")
    assert [e.count for e in seen] == [1, 2, 1]
    log.close()

    reopened = EventLog(path)
    recent = reopened.recent()
    assert [(e.reason, e.count) for e in recent] == [("Serving", 1), ("AgentReady", 1), ("RankExited", 2)]
    assert [e.reason for e in reopened.recent(kind="Model", name="qwen")] == ["Serving", "RankExited"]
    # Only a repeat of the object's latest event is folded: an old one recurring is news again.
    again = reopened.record("Model", "qwen", "Warning", "RankExited", "rank 0 exited with code 1")
    assert again.count == 1
    assert reopened.recent(limit=1)[0].report().to_json()["object"] == {"kind": "Model", "name": "qwen"}
