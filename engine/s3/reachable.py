"""A cheap check, for preflight, that an S3 URL can be used: endpoint up, credentials accepted, bucket there."""

from __future__ import annotations

from engine.core.errors import TransferError
from engine.s3.client import make_session, translate
from engine.s3.url import parse_url


def check_reachable(url: str, endpoint_url: str | None = None, *, need_objects: bool = False,
                    profile: str | None = None) -> None:
    """One ListObjectsV2 of at most one key (the IAM action s3:ListBucket, which HeadBucket needs too, and what every
    pull and push asks for first), and one under the URL's prefix when `need_objects`; raises TransferError."""
    u = parse_url(url)
    sess = make_session(endpoint_url, profile=profile, attempts=2, connect_timeout=5.0, read_timeout=15.0)
    try:
        sess.client.list_objects_v2(Bucket=u.bucket, MaxKeys=1)
    except Exception as e:
        raise translate(e, sess, at=f"s3://{u.bucket}", op="check bucket") from e
    if not need_objects:
        return
    try:
        page = sess.client.list_objects_v2(Bucket=u.bucket, Prefix=u.list_prefix, MaxKeys=1)
    except Exception as e:
        raise translate(e, sess, at=str(u), op="list objects") from e
    if not page.get("Contents"):
        raise TransferError(f"no objects under {u}", at=str(u), hint="check the prefix (list it with `aws s3 ls`)")
