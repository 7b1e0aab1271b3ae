"""The store on object storage: an fsspec file system holding the layout of a local store under a URL prefix.

``Remote("s3://bucket/prefix")`` moves whole directories between the local cache and the object store, each with a
marker file that lists its files with their sizes and sha256 (an artifact's ``manifest.json``, a checkpoint's seal):

- ``put_dir`` uploads the files, then the marker LAST: a directory whose marker is missing is not finished, so a
  half-uploaded one is never taken for a finished one;
- ``get_dir`` reads the marker, downloads the files into a new local directory and checks every size and sha256
  before it returns (the caller renames the directory into place);
- ``create`` writes an object only if none is there (S3 ``If-None-Match: *``): what the leases stand on.

Every call is retried with backoff when the store does not answer (``RETRY_DELAYS``), then fails with one line
(``RemoteError``); a refusal (wrong credentials, a missing bucket) is not retried. Credentials come from where the
file system's library looks (for S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance role;
``AWS_ENDPOINT_URL`` for another endpoint such as SeaweedFS or MinIO) or from a Prefect block named by
``--store-block`` (prefect-aws's ``AwsCredentials``, ``MinIOCredentials`` or ``S3Bucket``): never from config values.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from sft_pipeline.errors import ConfigError, StageFailure

log = logging.getLogger("sft_pipeline.remote")
URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)")
RETRY_DELAYS = (2, 4, 8)  # seconds before retry 1, 2, 3 of a call the store did not answer (~15 s in all)
# where conditional create is implemented and tested (S3's If-None-Match; SeaweedFS 4.48 and AWS S3 honor it)
CONDITIONAL = ("s3", "s3a")
# the schemes a store is most often on (the error for an unknown one names them; fsspec knows many more)
COMMON = ("s3://bucket/prefix", "gs://bucket/prefix", "az://container/prefix", "file:///shared/dir")
# botocore's and aiohttp's names for "no answer" (their classes are not Python's ConnectionError)
_NO_ANSWER = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
              "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
              "ResponseStreamingError", "IncompleteReadError", "FSTimeoutError", "ProxyConnectionError"}
_REFUSED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
            "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403", "401"}


_CHECKED: dict[tuple[str, str | None], bool] = {}  # (url, block) -> conditional: checked once per process


class RemoteError(StageFailure):
    """An object-store call that failed after its retries, or that the store refused: one line, not retried again."""


class RemoteBroken(Exception):
    """A directory in the object store whose files do not match its marker (missing, resized, other bytes)."""


def is_url(location: Any) -> bool:
    return isinstance(location, str) and URL.fullmatch(location) is not None


def split(url: str) -> tuple[str, str]:
    m = URL.fullmatch(url)
    return m["scheme"].lower(), m["rest"].strip("/")


def known_schemes() -> set[str]:
    import fsspec

    return set(fsspec.available_protocols())


def check_scheme(url: str) -> None:
    """ConfigError (one line) for a URL whose scheme fsspec does not know, or whose library is not installed."""
    import fsspec

    scheme, rest = split(url)
    if scheme not in known_schemes():
        raise ConfigError(f"--store {url}: unknown URL scheme {scheme!r}; give a local directory or an fsspec URL, "
                          f"e.g. {', '.join(COMMON)}")
    if not rest:
        raise ConfigError(f"--store {url}: no bucket in the URL; e.g. {scheme}://my-bucket/sft-store")
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as e:
        hint = "pip install -e '.[s3]'" if scheme in ("s3", "s3a") else str(e)
        raise ConfigError(f"--store {url}: the {scheme}:// file system is not installed ({hint})") from None


def _codes(exc: BaseException) -> set[str]:
    """The error codes and HTTP status the store answered with, from ``exc`` and its causes (botocore keeps them
    on ``response``; s3fs raises Python errors caused by botocore's)."""
    out: set[str] = set()
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            out.update(str(c) for c in (code, status) if c)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return out


def transient(exc: BaseException) -> bool:
    """Whether asking the store again can help: no answer, a timeout, a 5xx or 429; never a refusal."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & _NO_ANSWER:
        return True
    codes = _codes(exc)
    if codes & _REFUSED or codes & {"NoSuchBucket", "404", "PreconditionFailed", "412"}:
        return False
    if any(c.isdigit() and (int(c) >= 500 or int(c) == 429) for c in codes) or codes & {"SlowDown", "InternalError"}:
        return True
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EINVAL, errno.EACCES)
    return False


def exists_already(exc: BaseException) -> bool:
    """A conditional create refused because the object is there (S3 412 PreconditionFailed, or FileExistsError)."""
    return isinstance(exc, FileExistsError) or bool(_codes(exc) & {"PreconditionFailed", "412"})


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path, files: dict[str, dict]) -> str | None:
    """Why the files under ``root`` do not match ``files`` (``{rel: {size, sha256}}``), or None."""
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            return f"file missing: {rel}"
        if p.stat().st_size != meta["size"]:
            return f"size differs: {rel}"
        if meta.get("sha256") and sha256(p) != meta["sha256"]:
            return f"content differs: {rel}"
    return None


def _block_options(block: str) -> tuple[dict, str | None]:
    """fsspec options (and, for an ``S3Bucket``, the store URL) from a Prefect block ``<type-slug>/<name>``.

    The values stay in this process's memory (the file system object): never in parameters, logs or files."""
    try:
        import prefect_aws  # noqa: F401 - registers the AWS block types before Block.load looks them up
        from prefect.blocks.core import Block
    except ImportError:
        raise ConfigError(f"--store-block {block}: reading an AWS block needs prefect-aws: "
                          "pip install -e '.[s3]'") from None
    try:
        b = Block.load(block, _sync=True)
    except Exception as e:  # noqa: BLE001 - a missing block, a wrong slug or no API: one line, the cause named
        raise ConfigError(f"--store-block {block}: cannot load the Prefect block ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}); name it <type>/<name>, e.g. "
                          "aws-credentials/sft-store or s3-bucket/sft-store") from None
    url = None
    if type(b).__name__ == "S3Bucket":
        url = f"s3://{b.bucket_name}/{(b.bucket_folder or '').strip('/')}".rstrip("/")
        b = b.credentials
    params = b.aws_client_parameters
    opts: dict[str, Any] = {}
    if type(b).__name__ == "MinIOCredentials":
        opts.update(key=b.minio_root_user, secret=b.minio_root_password.get_secret_value())
    elif type(b).__name__ == "AwsCredentials":
        frozen = b.get_boto3_session().get_credentials()  # keys, a profile or an assumed role: boto3 resolves it
        if frozen is not None:
            frozen = frozen.get_frozen_credentials()
            opts.update(key=frozen.access_key, secret=frozen.secret_key, token=frozen.token)
    else:
        raise ConfigError(f"--store-block {block}: a {type(b).__name__} block holds no AWS credentials; use "
                          "aws-credentials/<name>, minio-credentials/<name> or s3-bucket/<name>")
    client: dict[str, Any] = {}
    if params is not None and params.endpoint_url:
        client["endpoint_url"] = str(params.endpoint_url)
    if getattr(b, "region_name", None):
        client["region_name"] = b.region_name
    if client:
        opts["client_kwargs"] = client
    return opts, url


class Remote:
    """One object-store prefix (``url``); paths given to its methods are relative to it (``train/<key>``)."""

    def __init__(self, url: str | None, block: str | None = None):
        self.block = block
        self._url = url.rstrip("/") if url else None
        self._fs = None
        self.conditional: bool | None = None  # does the store honor conditional create (checked by ``check``)

    # ------------------------------------------------------------------ the file system
    def _connect(self) -> None:
        import fsspec

        opts: dict[str, Any] = {}
        if self.block:
            opts, url = _block_options(self.block)
            if url and self._url and url.rstrip("/") != self._url:
                raise ConfigError(f"--store {self._url} differs from the bucket of --store-block {self.block} "
                                  f"({url}): give one of them")
            self._url = self._url or url
        if not self._url:
            raise ConfigError(f"--store-block {self.block} names no bucket: give --store s3://bucket/prefix too")
        scheme, rest = split(self._url)
        if scheme in ("s3", "s3a"):
            # botocore's own retries short (ours say what they retry); fresh listings: other machines write too
            opts.setdefault("config_kwargs", {"retries": {"max_attempts": 3, "mode": "standard"},
                                              "connect_timeout": 10, "read_timeout": 120})
        self._fs = fsspec.filesystem(scheme, skip_instance_cache=True, use_listings_cache=False, **opts)
        self.scheme, self.prefix = scheme, self._fs._strip_protocol(self._url).rstrip("/")

    @property
    def fs(self):
        if self._fs is None:
            self._connect()
        return self._fs

    @property
    def url(self) -> str:
        if self._url is None:
            self._connect()
        return self._url

    def path(self, rel: str = "") -> str:
        self.fs  # noqa: B018 - connects (sets prefix)
        return f"{self.prefix}/{rel}".rstrip("/") if rel else self.prefix

    def url_of(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def endpoint(self) -> str:
        """Where the store is (an S3 endpoint), for messages."""
        client = getattr(self.fs, "s3", None)
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or self.scheme

    def credentials_source(self) -> str:
        if self.block:
            return f"the Prefect block {self.block}"
        if self.scheme.startswith("s3"):
            if os.environ.get("AWS_ACCESS_KEY_ID"):
                return "the environment (AWS_ACCESS_KEY_ID)"
            if os.environ.get("AWS_PROFILE") or Path("~/.aws").expanduser().is_dir():
                return f"~/.aws (profile {os.environ.get('AWS_PROFILE', 'default')})"
            return "botocore's default chain (no AWS_ACCESS_KEY_ID, no ~/.aws: an instance or pod role)"
        return f"the {self.scheme} library's defaults"

    # ------------------------------------------------------------------ retries
    def call(self, what: str, fn: Callable[[], Any], retries: int = len(RETRY_DELAYS)) -> Any:
        """``fn()``, retried with backoff while the store does not answer; then RemoteError with one line."""
        for attempt in range(retries + 1):
            try:
                return fn()
            except BaseException as e:  # noqa: BLE001 - classified: retried, or raised as one line
                if isinstance(e, (KeyboardInterrupt, SystemExit, RemoteError)):
                    raise
                if not transient(e):
                    raise RemoteError(self._refused(what, e)) from e
                if attempt == retries:
                    raise RemoteError(f"{what}: the object store at {self.endpoint()} did not answer after "
                                      f"{retries + 1} attempts ({_short(e)})") from e
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.warning("%s: the object store did not answer (%s). Retry %d/%d in %g s", what, _short(e),
                            attempt + 1, retries, delay)
                time.sleep(delay)

    def _refused(self, what: str, e: BaseException) -> str:
        codes = _codes(e)
        bucket = self.prefix.split("/", 1)[0]
        if "NoSuchBucket" in codes or (what.startswith("opening bucket") and isinstance(e, FileNotFoundError)):
            return f"{what}: bucket {bucket!r} does not exist at {self.endpoint()}: create it, or fix the URL"
        if type(e).__name__ == "NoCredentialsError":
            return (f"{what}: no credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws, an "
                    "instance role, or a Prefect block named by --store-block)")
        if codes & _REFUSED or isinstance(e, PermissionError):
            code = sorted(c for c in codes if not c.isdigit()) or [type(e).__name__]
            return (f"{what}: the object store at {self.endpoint()} refused the credentials from "
                    f"{self.credentials_source()} ({code[0]})")
        return f"{what}: {_short(e)}"

    # ------------------------------------------------------------------ objects
    def read_bytes(self, rel: str, retries: int = len(RETRY_DELAYS)) -> bytes | None:
        """The object's bytes, or None when there is none."""
        def get():
            try:
                return self.fs.cat_file(self.path(rel))
            except FileNotFoundError:
                return None
        return self.call(f"reading {self.url_of(rel)}", get, retries)

    def read_json(self, rel: str, retries: int = len(RETRY_DELAYS)) -> Any | None:
        data = self.read_bytes(rel, retries)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def write_bytes(self, rel: str, data: bytes, retries: int = len(RETRY_DELAYS)) -> None:
        self.call(f"uploading {self.url_of(rel)}", lambda: self.fs.pipe_file(self.path(rel), data), retries)

    def create(self, rel: str, data: bytes, retries: int = len(RETRY_DELAYS)) -> bool:
        """Write the object only if none is there; False when one is (someone else created it first)."""
        def put():
            try:
                self.fs.pipe_file(self.path(rel), data, mode="create")
                return True
            except BaseException as e:  # noqa: BLE001 - "it exists" is an answer; anything else goes to call()
                if exists_already(e):
                    return False
                raise
        return self.call(f"creating {self.url_of(rel)}", put, retries)

    def exists(self, rel: str, retries: int = len(RETRY_DELAYS)) -> bool:
        return self.call(f"looking up {self.url_of(rel)}", lambda: self.fs.exists(self.path(rel)), retries)

    def find(self, rel: str, retries: int = len(RETRY_DELAYS)) -> dict[str, int]:
        """Every object under ``rel``: ``{path relative to rel: size}`` (empty when there is none)."""
        base = self.path(rel)

        def ls():
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {p[len(base) + 1:]: int(info.get("size") or 0) for p, info in found.items()
                    if p.startswith(base + "/") and info.get("type", "file") != "directory"}
        return self.call(f"listing {self.url_of(rel)}", ls, retries)

    def delete(self, rels: list[str], retries: int = len(RETRY_DELAYS)) -> None:
        paths = [self.path(r) for r in rels]
        if paths:
            def rm():
                try:
                    self.fs.rm(paths)
                except FileNotFoundError:
                    pass
            self.call(f"deleting {len(paths)} objects under {self.url}", rm, retries)

    def delete_tree(self, rel: str, retries: int = len(RETRY_DELAYS)) -> None:
        self.delete([f"{rel}/{p}" for p in self.find(rel, retries)], retries)

    # ------------------------------------------------------------------ directories with a marker written last
    def put_dir(self, local: Path, rel: str, marker: str, files: list[str],
                before_marker: Callable[[], None] | None = None, retries: int = len(RETRY_DELAYS),
                create_marker: bool = False) -> bool:
        """Upload ``files`` (relative to ``local``), then ``local/marker`` LAST. ``create_marker``: only if no
        marker is there yet; returns False when there was one (someone else finished first), else True."""
        local = Path(local)
        names = [f for f in files if f != marker]
        if names:
            self.call(f"uploading {len(names)} files to {self.url_of(rel)}",
                      lambda: self.fs.put([str(local / f) for f in names], [self.path(f"{rel}/{f}") for f in names]),
                      retries)
        if before_marker is not None:
            before_marker()
        data = (local / marker).read_bytes()
        if create_marker:
            return self.create(f"{rel}/{marker}", data, retries)
        self.write_bytes(f"{rel}/{marker}", data, retries)
        return True

    def get_dir(self, rel: str, marker: str, dest: Path, files: dict[str, dict] | None = None,
                retries: int = len(RETRY_DELAYS)) -> dict:
        """Download ``rel`` into the new directory ``dest``: its marker's files, checked (sizes and sha256), then the
        marker. Returns the marker's JSON. RemoteBroken when there is no marker or the files do not match it; the
        caller removes ``dest``."""
        raw = self.read_bytes(f"{rel}/{marker}", retries)
        if raw is None:
            raise RemoteBroken("no marker")
        try:
            meta = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise RemoteBroken(f"{marker} is not JSON") from None
        listed = (files if files is not None else meta.get("files")) if isinstance(meta, dict) else None
        if listed is None:  # a marker that lists nothing (an old seal): everything there is
            listed = {p: {"size": s} for p, s in self.find(rel, retries).items() if p != marker}
        dest = Path(dest)
        dest.mkdir(parents=True)
        names = sorted(listed)
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if names:
            def get():
                try:
                    self.fs.get([self.path(f"{rel}/{n}") for n in names], [str(dest / n) for n in names])
                except FileNotFoundError as e:
                    raise RemoteBroken(f"file missing: {e}") from None
            self.call(f"downloading {len(names)} files from {self.url_of(rel)}", get, retries)
        problem = verify(dest, listed)
        if problem:
            raise RemoteBroken(problem)
        (dest / marker).write_bytes(raw)
        return meta if isinstance(meta, dict) else {}

    # ------------------------------------------------------------------ up-front checks
    def check(self) -> None:
        """ConfigError (one line) when the store cannot be used: an unknown scheme, no such bucket, refused
        credentials, or no answer after the retries. Also finds out whether it honors conditional create (the
        leases need it): a store that does not gets a WARNING and works without cross-machine locks."""
        if self._url:
            check_scheme(self._url)
        asked = (self._url, self.block)
        if asked in _CHECKED:
            self.conditional = _CHECKED[asked]
            return
        try:
            self.fs  # noqa: B018 - connects (a block is loaded here)
            self._probe()
            _CHECKED[asked] = self.conditional
        except RemoteError as e:
            cause = e.__cause__
            if cause is not None and not transient(cause):
                raise ConfigError(f"--store {self.url}: {str(e).split(': ', 1)[1]}") from None
            raise ConfigError(f"--store {self.url}: the object store at {self.endpoint()} is unreachable "
                              f"({_short(cause) if cause else e}); check the endpoint (AWS_ENDPOINT_URL for "
                              "S3-compatible servers) and the network; nothing ran") from None

    def _probe(self) -> None:
        """Write a probe object twice with conditional create: the second must be refused."""
        import uuid

        if self.scheme.startswith("s3"):
            bucket = self.prefix.split("/", 1)[0]
            self.call(f"opening bucket {bucket}",
                      lambda: self.fs.call_s3("list_objects_v2", Bucket=bucket, MaxKeys=1))
        else:
            self.call(f"opening {self.url}", lambda: self.fs.makedirs(self.prefix, exist_ok=True))
        probe = f".locks/probe-{uuid.uuid4().hex}"
        if self.scheme not in CONDITIONAL:
            self.write_bytes(probe, b"probe")
            self.delete([probe])
            self.conditional = False
            log.warning("the object store %s: cross-machine locks need conditional create, which sft-pipeline "
                        "implements for s3:// only; two machines running the same stage at once may both compute "
                        "it (each artifact still appears whole, with its manifest last)", self.url)
            return
        first = self.create(probe, b"probe")
        second = self.create(probe, b"probe")
        self.delete([probe])
        self.conditional = first and not second
        if not self.conditional:
            log.warning("the object store at %s does not honor conditional create (If-None-Match: *): "
                        "cross-machine locks are off; two machines running the same stage at once may both "
                        "compute it (each artifact still appears whole, with its manifest last)", self.endpoint())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    codes = sorted(c for c in _codes(e) if not c.isdigit())
    name = codes[0] if codes else type(e).__name__
    return f"{name}: {text}" if text and text != name else name

