"""The master over HTTPS: `genmlx tls selfsigned` writes a certificate and key, `spec.master.tls`
names them, and the master serves only TLS on its port. The CLI trusts the certificate the manifest
names, the real ``openai`` client does once given it, a client that does not know it refuses the
connection, and plain HTTP gets nothing."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from conftest import Proc, free_port, wait_until

pytestmark = pytest.mark.e2e


def genmlx(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genmlx", *args],
        env={**os.environ, "GENMLX_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, demo_model_dir):
    root = tmp_path_factory.mktemp("tls")
    home = root / "home"
    made = genmlx(home, "tls", "selfsigned", "--out", str(root / "tls"))
    assert made.returncode == 0, made.stderr
    assert (root / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    port, serving_port = free_port(), free_port()
    manifest = root / "cluster.yaml"
    manifest.write_text(f"""\
apiVersion: genmlx/v1
kind: Cluster
metadata: {{name: tls}}
spec:
  master:
    node: solo
    port: {port}
    tls: {{certFile: {root / "tls" / "cert.pem"}, keyFile: {root / "tls" / "key.pem"}}}
  nodes:
    - {{name: solo, storage: [{{path: {demo_model_dir.parent}}}]}}
  models:
    - {{name: tiny, source: "file://{demo_model_dir}", nodes: [solo], serving: {{port: {serving_port}}}}}
""")
    genmlx(home, "token")
    env = {**os.environ, "GENMLX_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    up = Proc([sys.executable, "-m", "genmlx", "up", "-f", str(manifest)], root / "up.log", env)
    try:

        def ready() -> bool:
            status = genmlx(home, "status", "-f", str(manifest), "-o", "json")
            return status.returncode == 0 and json.loads(status.stdout)["conditions"][0]["status"] == "True"

        wait_until(ready, 120, what="the cluster to be Ready over HTTPS")
        token = (home / "token").read_text().strip()
        yield {
            "home": home,
            "manifest": manifest,
            "port": port,
            "cert": root / "tls" / "cert.pem",
            "token": token,
        }
    finally:
        up.stop()
        print(up.output())


def test_a_client_given_the_certificate_completes_over_https(tls_cluster) -> None:
    client = openai.OpenAI(
        base_url=f"https://127.0.0.1:{tls_cluster['port']}/v1",
        api_key=tls_cluster["token"],
        http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=tls_cluster["cert"])),
        max_retries=0,
    )
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3


def test_a_client_that_does_not_know_the_certificate_refuses_it(tls_cluster) -> None:
    with pytest.raises(urllib.error.URLError) as refused:
        urllib.request.urlopen(f"https://127.0.0.1:{tls_cluster['port']}/healthz", timeout=10)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


def test_plain_http_gets_nothing_from_the_port(tls_cluster) -> None:
    with socket.create_connection(("127.0.0.1", tls_cluster["port"]), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = connection.recv(4096)
        except ConnectionResetError:  # what a TLS server does with plain HTTP
            reply = b""
    assert not reply.startswith(b"HTTP/")


def test_the_cli_and_the_integrations_use_https(tls_cluster) -> None:
    printed = genmlx(tls_cluster["home"], "integrations", "codex", "-f", str(tls_cluster["manifest"]))
    assert printed.returncode == 0, printed.stderr
    assert f"https://127.0.0.1:{tls_cluster['port']}/v1" in printed.stdout
