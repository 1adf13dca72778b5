from bundle.store import Clock


def test_clock_counts_a_nested_stage_once(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("bundle.store.time.time", lambda: now[0])
    clock = Clock()

    def stage(name: str, start: float, end: float) -> None:
        now[0] = end
        clock.add(name, start)

    # fitting from 0 to 4, with two encodings inside it (1-2, 2.5-3); then applying from 4 to 5
    stage("encoding", 1.0, 2.0)
    stage("encoding", 2.5, 3.0)
    stage("fitting", 0.0, 4.0)
    stage("applying", 4.0, 5.0)
    assert clock.seconds == {"encoding": 1.5, "fitting": 2.5, "applying": 1.0}
    assert sum(clock.seconds.values()) == 5.0  # the whole run, nothing counted twice
    assert set(clock.peak_mb) == {"encoding", "fitting", "applying"} and clock.peak_mb["fitting"] > 0
