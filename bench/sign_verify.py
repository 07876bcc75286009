"""Benchmark: ``castiron sign`` / ``castiron verify`` next to ``openssl dgst`` on the same payload.

Bakes a tiny image (scratch + one file) in a temporary CASTIRON_HOME, generates a key, signs
the image, extracts the simple-signing payload and its DER signature from the store, then
times side by side with hyperfine (or, without it, a plain timing loop):

* ``castiron verify v1 --key k.pub``  - the whole command: start-up, resolve the tag, read and
  check every signature artifact and the DSSE provenance envelope;
* ``openssl dgst -sha256 -verify``    - the floor: one ECDSA check of the payload, nothing else;
* ``castiron sign v1 --key k.key``    - sign the image and its provenance (deterministic, so
  repeated runs rewrite nothing);
* ``openssl dgst -sha256 -sign``      - one ECDSA signature of the payload;

and the library call ``verify_image()`` in-process. Prints the figures and the ratios.

    .venv/bin/python bench/sign_verify.py [--runs 20]

Only the local disk is touched; the temporary directory is removed afterwards.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_model

from castiron.images.sign import ANN_SIGNATURE, SIGNATURE_ARTIFACT, verify_image
from castiron.images.store import ImageStore
from castiron.model import Digest

SPEC = "app: hello\nimage:\n  context: ./app\nservice:\n  port: 8080\n"


def machine() -> str:
    cpu = cpu_model()
    openssl = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{os.cpu_count()} CPU ({cpu}), kernel {platform.release()}, "
        f"Python {platform.python_version()}, {openssl}"
    )


def castiron_command() -> list[str]:
    script = Path(sys.executable).with_name("castiron")
    return [str(script)] if script.exists() else [sys.executable, "-m", "castiron.cli.main"]


def time_runs(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(commands: list[list[str]], runs: int, env: dict[str, str], tmp: Path) -> list[float]:
    if not shutil.which("hyperfine"):
        return [time_runs(c, runs, env) for c in commands]
    out = tmp / "hf.json"
    subprocess.run(
        [
            "hyperfine",
            "-N",
            "--style",
            "basic",
            "--warmup",
            "2",
            "--runs",
            str(runs),
            "--export-json",
            str(out),
            *(" ".join(c) for c in commands),
        ],
        check=True,
        env=env,
    )
    return [r["mean"] for r in json.loads(out.read_text(encoding="utf-8"))["results"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if not shutil.which("openssl"):
        print("openssl is needed as the peer", file=sys.stderr)
        return 1
    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="castiron-bench-sign-"))
    try:
        (tmp / "app").mkdir()
        (tmp / "app" / "hello.txt").write_text("hello\n")
        (tmp / "castiron.yaml").write_text(SPEC)
        home = tmp / "home"
        env = {
            **os.environ,
            "CASTIRON_HOME": str(home),
            "CASTIRON_SPEC": str(tmp / "castiron.yaml"),
            "SOURCE_DATE_EPOCH": "1700000000",
            "NO_COLOR": "1",
        }
        cli = castiron_command()
        key = tmp / "k"
        subprocess.run([*cli, "bake", "--tag", "v1"], check=True, env=env, capture_output=True)
        subprocess.run(
            [*cli, "keys", "generate", "--out", str(key)], check=True, env=env, capture_output=True
        )
        subprocess.run(
            [*cli, "sign", "v1", "--key", f"{key}.key"], check=True, env=env, capture_output=True
        )
        store = ImageStore(home / "images")
        digest = Digest(store.resolve("v1"))
        (sig_artifact,) = [
            d.digest for d in store.referrers(digest) if d.artifact_type == SIGNATURE_ARTIFACT
        ]
        layer = store.read_json(sig_artifact)["layers"][0]
        payload = tmp / "payload.json"
        payload.write_bytes(store.read_blob(layer["digest"]))
        sig = tmp / "sig.der"
        sig.write_bytes(base64.b64decode(layer["annotations"][ANN_SIGNATURE]))

        lib = []
        for _ in range(max(args.runs, 50)):
            start = time.perf_counter()
            result = verify_image(store, digest, [Path(f"{key}.pub")])
            lib.append(time.perf_counter() - start)
            assert result.ok
        verify_cli = [*cli, "verify", "v1", "--key", f"{key}.pub"]
        verify_ssl = [
            "openssl",
            "dgst",
            "-sha256",
            "-verify",
            f"{key}.pub",
            "-signature",
            str(sig),
            str(payload),
        ]
        sign_cli = [*cli, "sign", "v1", "--key", f"{key}.key"]
        sign_ssl = [
            "openssl",
            "dgst",
            "-sha256",
            "-sign",
            f"{key}.key",
            "-out",
            str(tmp / "sig2.der"),
            str(payload),
        ]
        v_cli, v_ssl, s_cli, s_ssl = measure(
            [verify_cli, verify_ssl, sign_cli, sign_ssl], args.runs, env, tmp
        )
        lib_s = statistics.median(lib)
        how = "hyperfine mean" if shutil.which("hyperfine") else "median"
        print()
        print(f"castiron verify (CLI):          {v_cli * 1000:7.1f} ms  ({how}, {args.runs} runs)")
        print(f"verify_image() (library):       {lib_s * 1000:7.2f} ms  (median)")
        print(f"openssl dgst -verify:           {v_ssl * 1000:7.1f} ms  ({how})")
        print(f"castiron sign (CLI):            {s_cli * 1000:7.1f} ms  ({how})")
        print(f"openssl dgst -sign:             {s_ssl * 1000:7.1f} ms  ({how})")
        print(f"ratio verify CLI / openssl:     {v_cli / v_ssl:.1f}x")
        print(f"ratio verify library / openssl: {lib_s / v_ssl:.2f}x")
        print(f"ratio sign CLI / openssl:       {s_cli / s_ssl:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
