"""Secret values are masked wherever they appear, in text, JSON and chunked byte streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from castiron.agent.logpump import pump
from castiron.redact import Redactor


def test_text_and_json_are_masked_longest_value_first() -> None:
    redactor = Redactor(["hunter2-db", "hunter2-db-replica", "ab"])
    assert redactor.values == {"hunter2-db", "hunter2-db-replica"}  # "ab" is too short
    assert redactor.text("pw=hunter2-db-replica;x=hunter2-db") == "pw=***;x=***"
    assert redactor.json({"out": ["a hunter2-db b", 3, None], "hunter2-db": True}) == {
        "out": ["a *** b", 3, None],
        "***": True,
    }
    assert redactor.data("é hunter2-db".encode()) == "é ***".encode()


def test_an_empty_redactor_changes_nothing() -> None:
    redactor = Redactor()
    assert not redactor
    assert redactor.text("hunter2") == "hunter2"
    assert redactor.stream().feed(b"hunter2") == b"hunter2"


def test_a_multi_line_value_is_masked_whole_and_line_by_line() -> None:
    pem = "-----BEGIN KEY-----\nMIIBVQIBADANBgkq\n-----END KEY-----"
    redactor = Redactor([pem])
    assert redactor.text(f"key: {pem}") == "key: ***"
    assert redactor.text("line MIIBVQIBADANBgkq seen") == "line *** seen"


SECRETS = ["s3cr3t-value", "s3cr3t", "tok-0123456789"]


@given(
    parts=st.lists(
        st.sampled_from([*SECRETS, "a", "s3c", "tok-", "\n", "xyz", "s3cr3"]), max_size=30
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_a_stream_cut_anywhere_is_masked_as_the_whole_text(
    parts: list[str], cuts: list[int]
) -> None:
    redactor = Redactor(SECRETS)
    data = "".join(parts).encode()
    stream = redactor.stream()
    out = b""
    last = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        out += stream.feed(data[last:cut])
        last = cut
    out += stream.feed(data[last:]) + stream.flush()
    assert out == redactor.data(data)
    for secret in SECRETS:
        assert secret.encode() not in out


def test_the_pump_masks_an_instances_output_on_its_way_to_the_log() -> None:
    read_end, write_end = os.pipe()
    log_read, log_write = os.pipe()
    os.write(write_end, b"password is hun")
    os.write(write_end, b"ter2-db!\nbye\n")
    os.close(write_end)
    pump([read_end], log_write, Redactor(["hunter2-db"]))
    os.close(log_write)
    assert os.read(log_read, 1000) == b"password is ***!\nbye\n"
    os.close(read_end)
    os.close(log_read)


def test_the_pump_process_reads_its_values_from_a_descriptor() -> None:
    values_read, values_write = os.pipe()
    os.write(values_write, json.dumps(["hunter2-db"]).encode())
    os.close(values_write)
    proc = subprocess.run(
        [sys.executable, "-m", "castiron.agent.logpump", "--secrets-fd", str(values_read)],
        input=b"db=hunter2-db\n",
        capture_output=True,
        pass_fds=(values_read,),
        check=False,
        timeout=30,
    )
    os.close(values_read)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"db=***\n", b"")
