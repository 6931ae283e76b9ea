"""A pull verifies the checkpoint, not only the transfer: objects replaced or truncated in the bucket by another
tool since the push (so each object's own checksum is self-consistent) are caught against quantdeck's
manifest.json and the index, named with the fix, and nothing is renamed into place."""

from __future__ import annotations

import json

import pytest

from engine.core.errors import CheckpointError
from tests.integration.s3_server import fresh_bucket, make_checkpoint, same_tree

MiB = 1 << 20


@pytest.fixture
def s3(request, tmp_path, monkeypatch):
    return fresh_bucket(request, tmp_path, monkeypatch)


def _quantdeck_checkpoint(path):
    """A checkpoint written by quantdeck's writer: shards, index and manifest.json with a digest per shard."""
    import torch

    from engine.checkpoint import write_checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16)
               for i in range(3)}
    tensors["lm_head.weight"] = torch.randn(32, 128, generator=g)
    write_checkpoint(path, tensors, shard_size=20_000)
    (path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 3}))
    return path


def _shards(path):
    return sorted(p.name for p in path.glob("*.safetensors"))


def test_pull_names_a_replaced_and_a_truncated_shard_and_renames_nothing(s3, tmp_path, capsys):
    from engine.s3 import pull, push

    server, bucket, c = s3
    src = _quantdeck_checkpoint(tmp_path / "src")
    assert json.loads((src / "manifest.json").read_text())["shards"]
    shards = _shards(src)
    assert len(shards) >= 3
    push(src, f"s3://{bucket}/ck", endpoint_url=server.url)

    # another tool: same size, different bytes (no quantdeck metadata, so the transfer alone would pass) ...
    replaced, truncated = shards[0], shards[1]
    body = bytearray((src / replaced).read_bytes())
    body[-4:] = bytes(b ^ 0x5A for b in body[-4:])
    c.put_object(Bucket=bucket, Key=f"ck/{replaced}", Body=bytes(body))
    # ... and a shard cut short
    c.put_object(Bucket=bucket, Key=f"ck/{truncated}", Body=(src / truncated).read_bytes()[:-100])

    dst = tmp_path / "out" / "ck"
    with pytest.raises(CheckpointError) as ei:
        pull(f"s3://{bucket}/ck", dst, endpoint_url=server.url)
    err = ei.value
    assert err.msg.startswith("pulled checkpoint is inconsistent: ")
    assert replaced in err.msg and "sha256 differs" in err.msg and "manifest.json" in err.msg
    assert truncated in err.msg
    assert err.at == f"s3://{bucket}/ck/{replaced}"
    assert "re-push the checkpoint from its source" in err.hint and "delete the bad object" in err.hint
    assert not dst.exists() and dst.with_name("ck.partial").is_dir()

    # the CLI says it in one line, with the object and the fix
    from console.cli import main

    capsys.readouterr()
    code = main(["s3", "pull", "-q", f"s3://{bucket}/ck", str(tmp_path / "cli" / "ck"), "--endpoint-url", server.url])
    cap = capsys.readouterr()
    assert code == 3 and cap.out == "", cap
    assert cap.err.startswith(f"quantdeck: error: s3://{bucket}/ck/{replaced}: pulled checkpoint is inconsistent: "
                              f"{replaced}: same size, but its sha256 differs") and \
        cap.err.count("\n") == 1 and "(hint: the object was replaced" in cap.err, cap.err
    assert not (tmp_path / "cli" / "ck").exists()

    # the bucket repaired from the source: the resumed pull fetches the two objects again and passes
    push(src, f"s3://{bucket}/ck", endpoint_url=server.url)
    res = pull(f"s3://{bucket}/ck", dst, endpoint_url=server.url)
    assert res.transferred == 2
    assert same_tree(src, dst) == []


def test_pull_checks_shards_against_the_index_without_a_manifest(s3, tmp_path):
    """A checkpoint without quantdeck's manifest (e.g. a Hugging Face one): headers against the index and the
    header's length; a good one passes."""
    from engine.s3 import pull, push

    server, bucket, c = s3
    src = make_checkpoint(tmp_path / "hf", big_mib=1)
    push(src, f"s3://{bucket}/hf", endpoint_url=server.url)
    good = pull(f"s3://{bucket}/hf", tmp_path / "good", endpoint_url=server.url)
    assert good.transferred == 7 and same_tree(src, tmp_path / "good") == []

    # a shard swapped for another model's (its header holds other tensors), and one cut short
    import numpy as np
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"model.layers.9.mlp.weight": np.zeros((4, 4), np.float16)}, str(other))
    c.put_object(Bucket=bucket, Key="hf/model-00003-of-00003.safetensors", Body=other.read_bytes())
    c.put_object(Bucket=bucket, Key="hf/model-00002-of-00003.safetensors",
                 Body=(src / "model-00002-of-00003.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError) as ei:
        pull(f"s3://{bucket}/hf", tmp_path / "bad", endpoint_url=server.url)
    err = ei.value
    assert err.at == f"s3://{bucket}/hf/model-00002-of-00003.safetensors"
    assert "model-00002-of-00003.safetensors: truncated" in err.msg
    assert "model-00003-of-00003.safetensors" in err.msg
    assert not (tmp_path / "bad").exists()

    from engine.checkpoint.verify import check_tree

    found = [d.line() for d in check_tree(tmp_path / "bad.partial")]
    assert "model-00003-of-00003.safetensors: header lacks 1 tensor(s) the index maps to it (first: " \
           "lm_head.weight)" in found
    assert "model-00003-of-00003.safetensors: header holds 1 tensor(s) the index does not map to it (first: " \
           "model.layers.9.mlp.weight)" in found
