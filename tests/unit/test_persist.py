from pathlib import Path

from aqtune.act.ledger import Entry
from aqtune.act.persist import sync_host_file


def entry(netns: str, original: int, applied: int) -> Entry:
    return Entry(netns, 1, "net.core.somaxconn", original, applied, None, 0.0)


def test_only_host_values_aqtune_raised_are_persisted(tmp_path: Path) -> None:
    conf = tmp_path / "90-aqtune.conf"
    sync_host_file([entry("host", 128, 512), entry("aqt-x", 64, 256)], str(conf))
    lines = [line for line in conf.read_text().splitlines() if not line.startswith("#")]
    assert lines == ["net.core.somaxconn = 512"]


def test_file_vanishes_once_nothing_is_left(tmp_path: Path) -> None:
    conf = tmp_path / "90-aqtune.conf"
    sync_host_file([entry("host", 128, 512)], str(conf))
    sync_host_file([entry("host", 128, 128)], str(conf))
    assert not conf.exists()
