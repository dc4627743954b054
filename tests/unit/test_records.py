from aqtune.records import Listener


def listener(queue: int, backlog: int) -> Listener:
    return Listener("host", "tcp", "127.0.0.1:80", 80, queue, backlog, 0, 1, 2, 0)


def test_fill_exceeds_one_when_queue_holds_backlog_plus_one() -> None:
    assert listener(5, 4).fill == 1.25


def test_fill_of_listen_zero_counts_the_one_admitted_connection() -> None:
    assert listener(1, 0).fill == 1.0
    assert listener(0, 0).fill == 0.0
