"""A push killed mid-way (SIGKILL of the real `quantdeck s3 push` process) resumes without re-uploading
the objects it had finished; the PUTs are counted at the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.integration.s3_server import apply_env, child_env, client, fake_env, get_server, make_checkpoint, same_tree

MiB = 1 << 20


def test_killed_push_resumes_without_reuploading_finished_objects(tmp_path, monkeypatch):
    from engine.s3 import pull, push

    server = get_server()
    env = fake_env(tmp_path)
    apply_env(monkeypatch, env)
    bucket = "qd-killed-push"
    client(server).create_bucket(Bucket=bucket)
    src = make_checkpoint(tmp_path / "ckpt", big_mib=6)
    for i in range(4, 9):  # more shards, so the kill lands among them
        (src / f"extra-{i:05d}.safetensors").write_bytes(os.urandom(64 << 10))
    manifest = tmp_path / "push-manifest.json"
    url = f"s3://{bucket}/ckpt"
    server.clear()
    server.put_delay_s = 0.25  # a slow link: each PUT takes a quarter second
    proc = subprocess.Popen(
        [sys.executable, "-m", "console.cli", "s3", "push", str(src), url, "--endpoint-url", server.url,
         "--part-size", "5MiB", "--concurrency", "1", "--manifest", str(manifest)],
        env=child_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        done: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                done = json.loads(manifest.read_text())["objects"]
            except (OSError, ValueError, KeyError):
                done = {}
            if len(done) >= 3:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
    finally:
        server.put_delay_s = 0.0
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    done = json.loads(manifest.read_text())["objects"]
    total = len([p for p in src.rglob("*") if p.is_file()])
    assert 3 <= len(done) < total, f"kill landed outside the transfer: {len(done)} of {total} done"
    keys = {o["Key"] for o in client(server).list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "ckpt/model.safetensors.index.json" not in keys  # a half-pushed checkpoint has no index yet

    server.clear()
    res = push(src, url, endpoint_url=server.url, part_size=5 * MiB, manifest=manifest)
    for rel in done:  # nothing finished before the kill is sent again
        assert server.puts(f"/{bucket}/ckpt/{rel}") == [], rel
    assert res.skipped >= len(done) and res.transferred == total - res.skipped
    uploaded = {r.path for r in server.puts()}
    assert len(uploaded) == res.transferred
    pull(url, tmp_path / "back", endpoint_url=server.url)
    assert same_tree(src, tmp_path / "back") == []
