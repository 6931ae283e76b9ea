"""boto3 clients for quantdeck: the standard credential chain, an optional endpoint, retries we can count,
and the translation of boto errors into TransferError messages that never carry a credential."""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.core.errors import TransferError

FATAL_CODES_ACCESS = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
FATAL_CODES_CREDS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "InvalidClientTokenId", "UnrecognizedClientException"}
FATAL_CODES_BUCKET = {"NoSuchBucket"}
FATAL_CODES_REGION = {"PermanentRedirect", "AuthorizationHeaderMalformed", "301", "IllegalLocationConstraintException"}
RETRYABLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "500", "502", "503", "504", "RequestLimitExceeded",
                   "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch"}

HINT_CREDS = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (~/.aws/credentials), "
              "or run where an instance role is attached")


@dataclass
class S3Session:
    """A boto3 client plus what we need around it: the endpoint, a redactor, and a retry counter."""

    client: Any
    endpoint_url: str | None
    secrets: tuple[str, ...] = ()
    _retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def retries(self) -> int:
        """Request retries botocore made so far (throttling, connection errors, 5xx)."""
        return self._retries

    def count_retries(self, n: int) -> None:
        if n:
            with self._lock:
                self._retries += n

    def redact(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = text.replace(s, "***")
        return redact_patterns(text)


_KEY_PATTERNS = (
    re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{12,}"),
    re.compile(r"(?i)(aws_secret_access_key|aws_session_token|x-amz-security-token|signature|credential)=([^&\s,;]+)"),
)


def redact_patterns(text: str) -> str:
    """Masks anything shaped like an AWS key id, or a secret/signature in a query string."""
    text = _KEY_PATTERNS[0].sub("***", text)
    return _KEY_PATTERNS[1].sub(lambda m: f"{m.group(1)}=***", text)


def make_session(endpoint_url: str | None = None, *, profile: str | None = None, pool: int = 10,
                 attempts: int = 5, connect_timeout: float = 10.0, read_timeout: float = 60.0) -> S3Session:
    """A thread-safe S3 client from the standard credential chain (env, profile, SSO, instance role)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound

    try:
        bsession = boto3.session.Session(profile_name=profile)
    except ProfileNotFound:
        raise TransferError(f"AWS profile {profile!r} not found", at=f"profile {profile}",
                            hint="list profiles with `aws configure list-profiles` or unset AWS_PROFILE") from None
    secrets: list[str] = []
    try:
        creds = bsession.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            secrets = [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]
    except Exception:  # a broken profile surfaces on the first call, translated there
        secrets = []
    extra: dict[str, Any] = {}
    custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if custom:  # many S3-compatible stores reject the newer default request checksums
        extra = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    cfg = Config(retries={"max_attempts": max(1, attempts), "mode": "standard"}, max_pool_connections=max(pool, 10),
                 connect_timeout=connect_timeout, read_timeout=read_timeout, **extra)
    region = bsession.region_name or ("us-east-1" if custom else None)
    client = bsession.client("s3", endpoint_url=endpoint_url or None, config=cfg, region_name=region)
    sess = S3Session(client=client, endpoint_url=endpoint_url or client.meta.endpoint_url, secrets=tuple(secrets))

    def _after_call(http_response=None, parsed=None, **_kw):
        meta = (parsed or {}).get("ResponseMetadata", {}) if isinstance(parsed, dict) else {}
        sess.count_retries(int(meta.get("RetryAttempts", 0) or 0))

    client.meta.events.register("after-call.s3", _after_call)
    return sess


def root_cause(exc: BaseException) -> BaseException:
    """boto3's upload wraps the ClientError in S3UploadFailedError: the first cause that carries a response."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if getattr(cur, "response", None) is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return exc


def error_code(exc: BaseException) -> str:
    resp = getattr(root_cause(exc), "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", "") or "")
        if not code:
            code = str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        return code
    return ""


def _connection_error(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return isinstance(exc, (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError))


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx, dropped connections and torn downloads: worth another try of the object."""
    from boto3.exceptions import RetriesExceededError as Boto3RetriesExceededError
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, (IncompleteReadError, ResponseStreamingError, RetriesExceededError,
                        Boto3RetriesExceededError)):
        return True
    if _connection_error(exc):
        return not is_endpoint_unreachable(exc)
    return error_code(exc) in RETRYABLE_CODES


def is_endpoint_unreachable(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return isinstance(exc, (EndpointConnectionError, ConnectTimeoutError))


def translate(exc: BaseException, sess: S3Session | None, *, at: str, op: str) -> TransferError:
    """A boto/s3transfer exception → TransferError with a plain message and a hint; never a credential."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    redact = sess.redact if sess else redact_patterns
    endpoint = (sess.endpoint_url if sess else None) or "the AWS default endpoint"
    bucket = at[len("s3://"):].split("/", 1)[0] if at.startswith("s3://") else at
    if isinstance(exc, TransferError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return TransferError(f"no AWS credentials found for {op}", at=at, hint=HINT_CREDS, title="no credentials")
    if is_endpoint_unreachable(exc) or _connection_error(exc):
        return TransferError(f"cannot reach the S3 endpoint {endpoint} ({type(exc).__name__})", at=at,
                             hint="check --endpoint-url / endpoint_url (e.g. http://host:9000) and the network",
                             title="endpoint unreachable")
    code = error_code(exc)
    if code in FATAL_CODES_BUCKET or (code in ("404", "NotFound") and op == "check bucket"):
        return TransferError(f"bucket s3://{bucket} does not exist at {endpoint}", at=f"s3://{bucket}",
                             hint="check the bucket name (and endpoint); create it first for a push (aws s3 mb)",
                             title="bucket missing")
    if code in FATAL_CODES_ACCESS:
        return TransferError(f"access denied to {op} {at}", at=at,
                             hint="the credentials lack permission (pull needs s3:ListBucket and s3:GetObject; "
                                  "push needs s3:ListBucket, s3:PutObject and s3:GetObject to verify) — check the IAM "
                                  "or bucket policy, or the profile in use",
                             title="access denied")
    if code in FATAL_CODES_CREDS:
        return TransferError(f"the S3 endpoint rejected the credentials ({code}) for {op}", at=at,
                             hint="the access key is unknown or the secret is wrong/expired; " + HINT_CREDS,
                             title="credentials rejected")
    if code in FATAL_CODES_REGION:
        return TransferError(f"bucket {bucket!r} lives in another region ({code})", at=at,
                             hint="set AWS_REGION / AWS_DEFAULT_REGION to the bucket's region", title="wrong region")
    if code in ("NoSuchKey", "404", "NotFound"):
        return TransferError(f"object not found: {at}", at=at, hint="it vanished or was renamed during the transfer; "
                             "rerun to list again")
    msg = redact(str(exc))
    return TransferError(f"S3 {op} failed at {at}: {msg}", at=at,
                         hint="rerun to resume; already verified objects are skipped")


def is_fatal(exc: BaseException) -> bool:
    """Errors that no retry of another object would fix: stop the whole transfer."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)) or is_endpoint_unreachable(exc):
        return True
    code = error_code(exc)
    return code in FATAL_CODES_ACCESS | FATAL_CODES_CREDS | FATAL_CODES_BUCKET | FATAL_CODES_REGION
