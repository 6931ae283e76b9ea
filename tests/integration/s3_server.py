"""A real S3 endpoint for the tests: moto's server on 127.0.0.1 and a free port, one per test process.

It is moto's own WSGI app (what ThreadedMotoServer serves) behind a thin recorder that logs every request
(method, path, query) so tests can count PUTs, and that can slow PUTs down (a slow network) so a push can be
killed mid-way. Auth is moto's: off by default; `auth_enabled()` turns on its IAM checks for one test.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

FAKE_KEY_ID = "AKIAQDTESTFAKEKEY7Z3X"
FAKE_SECRET = "qdFakeSecret/DoNotLeak+9vQ2w8e7r6t5y4u3i2o1p0"
FAKE_TOKEN = "qdFakeSessionToken-DoNotLeak-Zm9vYmFy"


@dataclass
class Request:
    method: str
    path: str
    query: str


@dataclass
class S3Server:
    url: str
    requests: list[Request] = field(default_factory=list)
    put_delay_s: float = 0.0
    faults: dict[tuple[str, str], int] = field(default_factory=dict)  # (method, path) -> throttles left
    stats: dict[str, int] = field(default_factory=lambda: {"put": 0, "get": 0, "bytes_in": 0, "bytes_out": 0})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def puts(self, key_path: str | None = None) -> list[Request]:
        """PUT requests (PutObject, UploadPart), optionally only those for /bucket/key."""
        with self._lock:
            return [r for r in self.requests if r.method == "PUT" and (key_path is None or r.path == key_path)]

    def throttle(self, method: str, path: str, times: int) -> None:
        """The next `times` requests `method path` get S3's 503 SlowDown, as a busy bucket answers."""
        with self._lock:
            self.faults[(method, path)] = times

    def _take_fault(self, environ) -> bool:
        key = (environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""))
        with self._lock:
            if self.faults.get(key, 0) > 0:
                self.faults[key] -= 1
                return True
        return False

    def _record(self, environ) -> None:
        with self._lock:
            self.requests.append(Request(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""),
                                         environ.get("QUERY_STRING", "")))


_SERVER: S3Server | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_server() -> S3Server:
    """The process's moto server (started on first use, stopped when the process ends)."""
    global _SERVER
    if _SERVER is None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log lines in test output
        app = DomainDispatcherApplication(create_backend_app)
        port = free_port()
        srv = S3Server(url=f"http://127.0.0.1:{port}")

        def recorder(environ, start_response):
            srv._record(environ)
            if srv._take_fault(environ):
                body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                        b"<Message>Please reduce your request rate.</Message></Error>")
                environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                start_response("503 Slow Down", [("Content-Type", "application/xml"),
                                                 ("Content-Length", str(len(body)))])
                return [body]
            if environ.get("REQUEST_METHOD") == "PUT" and srv.put_delay_s and "/moto-api" not in environ.get(
                    "PATH_INFO", ""):
                time.sleep(srv.put_delay_s)
            method = environ.get("REQUEST_METHOD")
            if method == "PUT":
                with srv._lock:
                    srv.stats["put"] += 1
                    srv.stats["bytes_in"] += int(environ.get("CONTENT_LENGTH") or 0)
            body = app(environ, start_response)
            if method != "GET" or "list-type" in environ.get("QUERY_STRING", ""):
                return body
            return _counted(body, srv)

        httpd = make_server("127.0.0.1", port, recorder, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=httpd.serve_forever, daemon=True, name="moto-s3").start()
        _SERVER = srv
    return _SERVER


def _counted(body, srv: S3Server):
    n = 0
    for chunk in body:
        n += len(chunk)
        yield chunk
    with srv._lock:
        srv.stats["get"] += 1
        srv.stats["bytes_out"] += n


def _report_stats() -> None:
    if _SERVER is not None and os.environ.get("QD_S3_STATS"):
        st = _SERVER.stats
        print(f"\n[s3 test traffic] {st['put']} PUT requests ({st['bytes_in'] / 2**20:.1f} MiB in), "
              f"{st['get']} object GETs ({st['bytes_out'] / 2**20:.1f} MiB out)", file=sys.stderr)


atexit.register(_report_stats)


def fake_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Environment variables for fake credentials, isolated from any real AWS config on this machine."""
    env = {
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_SESSION_TOKEN": FAKE_TOKEN,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    env.update(extra)
    return env


REPO = Path(__file__).resolve().parents[2]


def child_env(env: dict[str, str]) -> dict[str, str]:
    """os.environ for a child python that imports this checkout, with `env` on top (AWS_* of the host dropped)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    out.update(env)
    return out


def apply_env(monkeypatch, env: dict[str, str]) -> None:
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ROLE_ARN",
              "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def client(server: S3Server):
    import boto3

    return boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", FAKE_KEY_ID),
                        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", FAKE_SECRET))


def fresh_bucket(request, tmp_path: Path, monkeypatch):
    """(server, bucket, boto3 client): the process's moto server, fake credentials in the environment, and a bucket
    of the test's own (named from its node id)."""
    import hashlib

    server = get_server()
    apply_env(monkeypatch, fake_env(tmp_path))
    bucket = "qd-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]
    c = client(server)
    c.create_bucket(Bucket=bucket)
    return server, bucket, c


def _moto_api(server: S3Server, path: str, body: bytes) -> None:
    req = urllib.request.Request(f"{server.url}/moto-api/{path}", data=body, method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


@contextmanager
def auth_enabled(server: S3Server):
    """moto checks signatures and IAM policies while inside (process-wide: tests here run one at a time)."""
    _moto_api(server, "reset-auth", b"0")
    try:
        yield
    finally:
        _moto_api(server, "reset-auth", b"inf")


def make_checkpoint(root: Path, big_mib: int = 12, seed: int = 0) -> Path:
    """A small multi-shard safetensors checkpoint: one shard of `big_mib` MiB (multipart at 5 MiB parts),
    two small shards, the index, config files and a tokenizer file."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = {
        "model-00001-of-00003.safetensors": {"model.layers.0.mlp.weight": rng.standard_normal(
            (big_mib * 512, 1024), dtype=np.float32).astype(np.float16)},
        "model-00002-of-00003.safetensors": {"model.layers.1.mlp.weight": rng.standard_normal((256, 512)).astype(
            np.float16), "model.layers.1.norm.weight": np.ones(512, dtype=np.float16)},
        "model-00003-of-00003.safetensors": {"lm_head.weight": rng.standard_normal((128, 512)).astype(np.float16)},
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(root / name))
        weight_map.update({t: name for t in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 2}))
    (root / "generation_config.json").write_text("{}")
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return root


def same_tree(a: Path, b: Path) -> list[str]:
    """Differences between two directory trees (file set and bytes); [] when identical."""
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in {a}: {x}" for x in sorted(fa - fb)] + [f"only in {b}: {x}" for x in sorted(fb - fa)]
    diffs += [f"differs: {x}" for x in sorted(fa & fb) if (a / x).read_bytes() != (b / x).read_bytes()]
    return diffs
