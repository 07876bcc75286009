"""The access log file: JSON lines, 0600, rotated by size, and never an error for traffic."""

from __future__ import annotations

import json
import os
from pathlib import Path

from castiron.traffic.accesslog import AccessLog, access_line


def line(i: int) -> str:
    return access_line(
        at=1_700_000_000.25,
        client="127.0.0.1",
        method="GET",
        path=f"/n/{i}",
        status=200,
        sent=10,
        upstream="127.0.0.1:1",
        release="r1",
        duration_ms=1.23456,
    )


def test_a_line_is_one_json_object() -> None:
    assert json.loads(line(1)) == {
        "time": "2023-11-14T22:13:20.250Z",
        "client": "127.0.0.1",
        "method": "GET",
        "path": "/n/1",
        "status": 200,
        "bytes": 10,
        "upstream": "127.0.0.1:1",
        "release": "r1",
        "duration_ms": 1.235,
    }


def test_the_log_rotates_and_keeps_a_bounded_number_of_files(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        log = AccessLog(tmp_path / "access" / "web.log", max_bytes=1000, keep=3)
    finally:
        os.umask(old)
    for i in range(200):
        log.write(line(i))
    log.close()
    names = sorted(p.name for p in (tmp_path / "access").iterdir())
    assert names == ["web.log", "web.log.1", "web.log.2", "web.log.3"]
    for p in (tmp_path / "access").iterdir():
        assert p.stat().st_mode & 0o777 == 0o600
        assert p.stat().st_size < 1000 + len(line(0)) + 1
    last = (tmp_path / "access" / "web.log").read_text().splitlines()
    assert json.loads(last[-1])["path"] == "/n/199"
    assert (tmp_path / "access").stat().st_mode & 0o777 == 0o700


def test_a_full_disk_drops_lines_without_raising() -> None:
    log = AccessLog(Path("/dev/full"), max_bytes=1 << 40)
    for i in range(5000):
        log.write(line(i))  # the buffer fills and its flush fails: ENOSPC
    log.flush()
    log.close()


def test_two_writers_of_one_file_never_split_a_line(tmp_path: Path) -> None:
    # router workers of one listener append to the same file
    path = tmp_path / "access" / "web.log"
    logs = [AccessLog(path, max_bytes=4000, keep=50, buffer_bytes=300) for _ in range(2)]
    for i in range(300):
        logs[i % 2].write(line(i))
    for log in logs:
        log.close()
    seen = []
    for p in (tmp_path / "access").iterdir():
        for text in p.read_text().splitlines():
            seen.append(json.loads(text)["path"])
    assert sorted(seen) == sorted(f"/n/{i}" for i in range(300))
