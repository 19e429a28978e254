"""The heartbeat's decision (mpisage.runtime.heartbeat.SilenceClock) on a fake clock: silence counts only while the
watcher itself runs, so a watcher that was stalled does not blame its peers; a peer silent while the watcher runs
is still blamed once the timeout has passed."""
from mpisage.runtime.heartbeat import SilenceClock


def _watch(clock, start, end, step, beats_from=()):
    """Passes of the watcher's loop every `step` s from start to end; peers in beats_from beat on every pass."""
    t, blamed = start, []
    while t < end:
        t += step
        clock.tick(t)
        for p in beats_from:
            clock.heard(p)
        blamed += [(p, t) for p in clock.silent_peers()]
    return blamed


def test_a_peer_silent_while_the_watcher_runs_is_blamed_after_the_timeout():
    clock = SilenceClock([1, 2], timeout=8.0, slack=1.0, now=0.0)
    blamed = _watch(clock, 0.0, 20.0, 0.5, beats_from=[2])
    assert blamed and {p for p, _ in blamed} == {1}
    assert 8.0 < blamed[0][1] <= 8.5       # named at the first pass after 8 s of silence


def test_a_stalled_watcher_does_not_blame_peers_that_beat_meanwhile():
    clock = SilenceClock([1, 2, 3], timeout=8.0, slack=1.0, now=0.0)
    assert not _watch(clock, 0.0, 5.0, 0.5, beats_from=[1, 2, 3])
    stalled = clock.tick(5.0 + 70.0)          # the watcher's own thread did not run for 70 s (GIL, swap, lock)
    assert stalled == 69.0 and clock.stalled == 69.0
    assert clock.silent_peers() == []         # judged before the beats queued meanwhile are drained: no blame
    assert not _watch(clock, 75.0, 100.0, 0.5, beats_from=[1, 2, 3])


def test_repeated_watcher_stalls_slow_detection_but_do_not_prevent_it():
    clock = SilenceClock([1], timeout=8.0, slack=1.0, now=0.0)
    blamed = _watch(clock, 0.0, 200.0, 5.0)   # the watcher runs only every 5 s: 1 s of silence per pass
    assert blamed and 40.0 < blamed[0][1] <= 45.0


def test_a_goodbye_is_not_silence():
    clock = SilenceClock([1, 2], timeout=8.0, slack=1.0, now=0.0)
    clock.gone(1)
    assert [p for p, _ in _watch(clock, 0.0, 20.0, 0.5, beats_from=[])] and \
        all(p == 2 for p, _ in _watch(clock, 20.0, 30.0, 0.5))


def test_checkpoint_interval_zero_checkpoints_only_an_early_stop():
    import pytest

    from mpisage.runtime.checkpoint import checkpoint_due
    from mpisage.config import ConfigError, load_config
    cfg = load_config(None, ["checkpoint.interval=0", "rounds=12"])
    assert not any(checkpoint_due(cfg, r, stop=False) for r in range(12))
    assert not checkpoint_due(cfg, 11, stop=True)          # the planned last round: no checkpoint
    assert checkpoint_due(cfg, 4, stop=True)               # stopped early (SIGTERM/SIGUSR1): resumable
    every3 = load_config(None, ["checkpoint.interval=3", "rounds=12"])
    assert [r for r in range(12) if checkpoint_due(every3, r, stop=False)] == [2, 5, 8, 11]
    with pytest.raises(ConfigError, match="checkpoint.interval"):
        load_config(None, ["checkpoint.interval=-1"])
