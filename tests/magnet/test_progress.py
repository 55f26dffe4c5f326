from magnet.progress import duration, time_left


def test_time_left_reads_as_a_person_says_it():
    assert [duration(s) for s in (0.4, 45, 185, 7620)] == ["0s", "45s", "3m05s", "2h07m"]
    assert time_left(done=10, remaining=30, elapsed=20.0) == "1m00s"
    assert time_left(done=0, remaining=30, elapsed=5.0) == "?"
