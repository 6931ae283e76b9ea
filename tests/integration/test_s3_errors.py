"""Each S3 failure an operator can meet gives its own message, place and hint — and no credential ever
shows up in an error, an event, a manifest or the CLI's output."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.core.errors import TransferError
from engine.core.events import JsonlSink
from engine.core.fsutil import free_bytes
from tests.integration.s3_server import (
    FAKE_KEY_ID,
    FAKE_SECRET,
    FAKE_TOKEN,
    apply_env,
    auth_enabled,
    child_env,
    client,
    fake_env,
    free_port,
    get_server,
    make_checkpoint,
)

SECRETS = [FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN]


@pytest.fixture
def s3(tmp_path, monkeypatch):
    server = get_server()
    apply_env(monkeypatch, fake_env(tmp_path))
    c = client(server)
    c.create_bucket(Bucket="qd-errors")
    c.put_object(Bucket="qd-errors", Key="ck/config.json", Body=b"{}")
    c.put_object(Bucket="qd-errors", Key="ck/model.safetensors", Body=b"\0" * 4096)
    return server


def _raises(fn, *a, **kw) -> TransferError:
    with pytest.raises(TransferError) as ei:
        fn(*a, **kw)
    return ei.value


def test_each_error_gives_its_message(s3, tmp_path, monkeypatch):
    from engine.s3 import check_reachable, pull, push

    server = s3
    sink = JsonlSink(tmp_path / "events.jsonl")
    seen: list[TransferError] = []
    src = make_checkpoint(tmp_path / "src", big_mib=1)

    # the preflight check passes quietly where all is well
    assert check_reachable("s3://qd-errors/ck", server.url, need_objects=True) is None
    assert check_reachable("s3://qd-errors/not-yet-pushed", server.url) is None

    # bucket missing: pull, push and the preflight check
    for e in (_raises(pull, "s3://qd-nosuchbucket/ck", tmp_path / "a", endpoint_url=server.url, sink=sink),
              _raises(push, src, "s3://qd-nosuchbucket/ck", endpoint_url=server.url, sink=sink),
              _raises(check_reachable, "s3://qd-nosuchbucket/ck", server.url)):
        assert e.title == "bucket missing" and "bucket s3://qd-nosuchbucket does not exist at" in e.msg, e.one_line()
        assert e.at == "s3://qd-nosuchbucket" and "bucket name" in e.hint
        seen.append(e)
    # an empty prefix is not a bucket problem
    e = _raises(pull, "s3://qd-errors/nothing-here", tmp_path / "b", endpoint_url=server.url)
    assert "no objects under s3://qd-errors/nothing-here" in e.msg and "prefix" in e.hint
    e = _raises(pull, "s3://qd-errors/ck/config.json", tmp_path / "b", endpoint_url=server.url)
    assert "is a single object" in e.hint
    seen.append(e)

    # wrong endpoint: nothing listens there
    wrong = f"http://127.0.0.1:{free_port()}"
    for e in (_raises(pull, "s3://qd-errors/ck", tmp_path / "c", endpoint_url=wrong, retries=0, sink=sink),
              _raises(check_reachable, "s3://qd-errors/ck", wrong)):
        assert e.title == "endpoint unreachable" and f"cannot reach the S3 endpoint {wrong}" in e.msg
        assert "--endpoint-url" in e.hint
        seen.append(e)

    # local disk too small: checked before any byte moves (here: room the later stages need is reserved)
    e = _raises(pull, "s3://qd-errors/ck", tmp_path / "d", endpoint_url=server.url, sink=sink,
                reserve_bytes=free_bytes(tmp_path) + (1 << 40))
    assert e.title == "disk too small" and "not enough disk for the pull" in e.msg and "free" in e.msg
    assert e.at == str(tmp_path / "d.partial") and "free space" in e.hint
    assert not any((tmp_path / "d.partial").iterdir())
    seen.append(e)

    # no credentials anywhere in the chain
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)
    for e in (_raises(pull, "s3://qd-errors/ck", tmp_path / "e", endpoint_url=server.url, sink=sink),
              _raises(check_reachable, "s3://qd-errors/ck", server.url)):
        assert e.title == "no credentials" and "no AWS credentials found" in e.msg
        assert "AWS_ACCESS_KEY_ID" in e.hint and "AWS_PROFILE" in e.hint and "instance role" in e.hint
        seen.append(e)
    apply_env(monkeypatch, fake_env(tmp_path))

    # access denied (moto enforcing IAM): a user who may list but not read, and one who may read but not write
    import boto3

    iam = boto3.client("iam", endpoint_url=server.url, region_name="us-east-1")
    keys = {}
    for user, actions in (("qd-lister", ["s3:ListBucket"]),
                          ("qd-reader", ["s3:ListBucket", "s3:GetObject"])):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        SECRETS.extend([keys[user]["AccessKeyId"], keys[user]["SecretAccessKey"]])
    with auth_enabled(server):
        monkeypatch.delenv("AWS_SESSION_TOKEN")
        for user, call in (("qd-lister", lambda: pull("s3://qd-errors/ck", tmp_path / "f", endpoint_url=server.url,
                                                      sink=sink)),
                           ("qd-reader", lambda: push(src, "s3://qd-errors/up", endpoint_url=server.url,
                                                      sink=sink))):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[user]["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[user]["SecretAccessKey"])
            e = _raises(call)
            op = "pull" if user == "qd-lister" else "push"
            assert e.title == "access denied" and e.msg.startswith(f"access denied to {op} s3://qd-errors/"), e.msg
            assert e.at.startswith("s3://qd-errors/") and "s3:GetObject" in e.hint and "s3:PutObject" in e.hint
            seen.append(e)
        assert not (tmp_path / "f").exists()
        # credentials the endpoint does not know
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        e = _raises(pull, "s3://qd-errors/ck", tmp_path / "g", endpoint_url=server.url, sink=sink)
        assert e.title == "credentials rejected" and "InvalidAccessKeyId" in e.msg
        seen.append(e)
    sink.close()

    text = "\n".join(x.one_line() + repr(x.__cause__) for x in seen) + (tmp_path / "events.jsonl").read_text()
    for s in SECRETS:
        assert s not in text


def test_credentials_never_appear_in_cli_output_events_or_manifests(s3, tmp_path):
    """The CLI in a child process, with distinctive fake keys: push, pull, and a failing pull; then grep
    everything it printed and wrote."""
    server = s3
    src = make_checkpoint(tmp_path / "src", big_mib=6)
    env = child_env(fake_env(tmp_path))
    outputs = []
    for args in (["push", str(src), "s3://qd-errors/cli", "--part-size", "5MiB"],
                 ["pull", "s3://qd-errors/cli", str(tmp_path / "dst")],
                 ["pull", "s3://qd-nosuchbucket/x", str(tmp_path / "dst2")],
                 ["pull", "s3://qd-errors/cli", str(tmp_path / "dst3"), "--endpoint-url",
                  f"http://127.0.0.1:{free_port()}", "--retries", "0"]):
        argv = [sys.executable, "-m", "console.cli", "s3", *args]
        if "--endpoint-url" not in args:
            argv += ["--endpoint-url", server.url]
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        outputs.append((args[0], r.returncode, r.stdout, r.stderr))
    (_, rc1, out1, _), (_, rc2, out2, _), (_, rc3, _, err3), (_, rc4, _, err4) = outputs
    assert rc1 == 0 and json.loads(out1)["transferred"] == 7
    assert rc2 == 0 and json.loads(out2)["bytes_transferred"] == json.loads(out1)["bytes"]
    assert rc3 == 1 and err3.startswith("quantdeck: error: bucket s3://qd-nosuchbucket does not exist")
    assert "(hint: " in err3 and "Traceback" not in err3
    assert rc4 == 1 and "cannot reach the S3 endpoint" in err4
    written = [p for p in tmp_path.rglob("*.json") if p.is_file()]
    assert any(p.name.endswith(".pull.json") for p in written) and any(".push-" in p.name for p in written)
    blob = "".join(o + e for _, _, o, e in outputs) + "".join(p.read_text() for p in written)
    for s in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN):
        assert s not in blob
