"""S3 pull and push: parallel, multipart, resumable and verified (boto3).

    from engine.s3 import pull, push, check_reachable
    pull("s3://bucket/models/dsv3-bf16", "/data/dsv3-bf16", endpoint_url=None, part_size=64 << 20, concurrency=8)
    push("/data/dsv3-nvfp4", "s3://bucket/models/dsv3-nvfp4")

Credentials: boto3's standard chain (env, AWS_PROFILE / ~/.aws, SSO, instance role); never logged, never in
an event, a manifest or an error message.

Verification policy:
- push stores the file's SHA-256 in the object's metadata (`x-amz-meta-quantdeck-sha256`) and, after the upload,
  checks size, that SHA-256 and the server's ETag against the multipart ETag computed locally for the part size
  boto3 used (the ETag is what proves the bytes arrived; SSE-KMS objects fall back to size + SHA-256);
- pull checks size, then the SHA-256 from metadata when quantdeck pushed the object; otherwise the ETag, recomputed
  for the uploader's part size (read from the server with HeadObject PartNumber=1, else common part sizes);
  an object with neither (SSE-KMS ETag, no metadata) is size-checked and a warning says so;
- a mismatch is retried (with backoff), then reported by object URL in a TransferError;
- before `<dst>.partial/` is renamed into place, the checkpoint itself is checked (engine.checkpoint.verify): shard
  digests against quantdeck's manifest.json where there is one, every safetensors header against the index and the
  file's length; an object replaced or truncated in the bucket since the push is named in a CheckpointError.

Resumption: a transfer manifest (JSON, written atomically after each verified object) records size, mtime, ETag
and SHA-256 per object; an entry still matching both sides is skipped without reading the file again. Pull builds
`<dst>.partial/` and renames it to `<dst>` when every object is verified; push uploads shards, then other files,
then the index and configs.
"""

from engine.s3.pull import default_pull_manifest, pull, remote_size
from engine.s3.push import default_push_manifest, push
from engine.s3.reachable import check_reachable
from engine.s3.transfer import DEFAULT_CONCURRENCY, DEFAULT_PART_SIZE, TransferResult
from engine.s3.url import S3Url, parse_url

__all__ = ["pull", "push", "check_reachable", "remote_size", "parse_url", "S3Url", "TransferResult",
           "DEFAULT_PART_SIZE", "DEFAULT_CONCURRENCY", "default_pull_manifest", "default_push_manifest"]
