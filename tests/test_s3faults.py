"""S3 storage through a proxy that fails requests: every fault kind is retried away by
botocore's standard mode, and a conditional write whose response was lost is not taken
for a lost race. The proxy itself is checked too: what it resets is a reset on the wire,
and what it forwards arrives at moto unchanged."""

from __future__ import annotations

import hashlib
import http.client
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from service.storage import PreconditionFailed, S3Storage, fetch_cached
from tests.s3faults import FAULTS, FaultProxy, read_body

PAYLOAD = b"spotlora " * 1000


def moto_store(s3_server: str, bucket: str) -> S3Storage:
    """The same prefix straight on moto: setup and checks, never faulted."""
    import boto3

    return S3Storage(f"s3://{bucket}/unit/", client=boto3.client("s3", endpoint_url=s3_server))


@pytest.fixture
def direct(s3_server: str, bucket: str) -> S3Storage:
    return moto_store(s3_server, bucket)


@pytest.fixture
def store(s3_faults: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """The product's own client (storage._s3_client), pointed at the proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_faults.endpoint)
    s3_faults.configure(slow_seconds=0.2)
    return S3Storage(f"s3://{bucket}/unit/")


# Each operation: (the HTTP method of the request to fault, setup on moto, the call and
# its check through the proxy).
Op = tuple[str, Callable[[S3Storage, Path], Any], Callable[[S3Storage, S3Storage, Path], None]]


def _noop(direct: S3Storage, tmp: Path) -> None:
    pass


def _put_obj(direct: S3Storage, tmp: Path) -> None:
    direct.write_bytes("obj", PAYLOAD)


def _write(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    store.write_bytes("obj", PAYLOAD)
    assert direct.read_bytes("obj") == PAYLOAD


def _read(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    assert store.read_bytes("obj") == PAYLOAD


def _head(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    info = store.head("obj")
    assert info is not None and info.size == len(PAYLOAD)
    assert store.head("absent") is None


def _list(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    assert [o.key for o in store.list_objects()] == ["obj"]


def _delete(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    store.delete(["obj"])
    assert direct.head("obj") is None


def _upload(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    local = tmp / "up.bin"
    local.write_bytes(PAYLOAD)
    store.upload_file(local, "obj")
    assert direct.read_bytes("obj") == PAYLOAD


def _download(store: S3Storage, direct: S3Storage, tmp: Path) -> None:
    store.download_file("obj", tmp / "down.bin")
    assert (tmp / "down.bin").read_bytes() == PAYLOAD


OPS: dict[str, Op] = {
    "write": ("PUT", _noop, _write),
    "read": ("GET", _put_obj, _read),
    "head": ("HEAD", _put_obj, _head),
    "list": ("GET", _put_obj, _list),
    "delete": ("POST", _put_obj, _delete),
    "upload": ("PUT", _noop, _upload),
    "download": ("GET", _put_obj, _download),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("fault", FAULTS)
def test_each_storage_operation_survives_each_fault(
    fault: str,
    op: str,
    store: S3Storage,
    direct: S3Storage,
    s3_faults: FaultProxy,
    tmp_path: Path,
) -> None:
    method, setup, call = OPS[op]
    setup(direct, tmp_path)
    s3_faults.add_rule(fault, method=method, times=1)
    call(store, direct, tmp_path)
    counts = s3_faults.counts()
    assert counts.faults == {fault: 1}
    # A fault that answers in the proxy's place costs one more request; the others
    # are forwarded and, but for lost_response, answered.
    assert counts.requests == counts.forwarded + (fault in ("error500", "slowdown503", "reset"))


def test_random_faults_across_many_concurrent_transfers(
    store: S3Storage, direct: S3Storage, s3_faults: FaultProxy, tmp_path: Path
) -> None:
    blobs = {f"many/{i:02d}.bin": hashlib.sha256(str(i).encode()).digest() * 64 for i in range(16)}
    for key, blob in blobs.items():
        direct.write_bytes(key, blob)
    s3_faults.configure(p=0.3, seed=4)
    fetched = fetch_cached(store, store.list_objects("many/"), tmp_path / "cache")
    assert len(fetched) == len(blobs)
    for key, blob in blobs.items():
        assert (tmp_path / "cache" / key).read_bytes() == blob
        store.write_bytes(f"copy/{key}", blob)
        assert direct.read_bytes(f"copy/{key}") == blob
    counts = s3_faults.counts()
    print("\n" + s3_faults.summary())
    assert counts.requests >= 2 * len(blobs) + 1
    assert counts.faulted >= 5
    assert (
        sum(counts.faults.values())
        + counts.forwarded
        - counts.faults.get("slow", 0)
        - counts.faults.get("lost_response", 0)
        == counts.requests
    )


# --------------------------------------------------------------------------- conditional


def test_if_none_match_write_whose_response_is_lost_succeeds(
    store: S3Storage, direct: S3Storage, s3_faults: FaultProxy
) -> None:
    s3_faults.add_rule("lost_response", method="PUT", path=r"/unit/LATEST$", times=1)
    tag = store.write_bytes("LATEST", PAYLOAD, if_none_match=True)
    info = direct.head("LATEST")
    assert info is not None and tag == info.etag
    assert direct.read_bytes("LATEST") == PAYLOAD
    counts = s3_faults.counts()
    # The write landed, its answer was lost, and the retry met it: 412.
    assert counts.faults == {"lost_response": 1}
    assert counts.statuses.get(412) == 1


def test_if_match_write_whose_response_is_lost_succeeds(
    store: S3Storage, direct: S3Storage, s3_faults: FaultProxy
) -> None:
    first = store.write_bytes("LATEST", b"generation 1", if_none_match=True)
    s3_faults.add_rule("lost_response", method="PUT", path=r"/unit/LATEST$", times=1)
    tag = store.write_bytes("LATEST", b"generation 2", if_match=first)
    info = direct.head("LATEST")
    assert info is not None and tag == info.etag != first
    assert direct.read_bytes("LATEST") == b"generation 2"
    assert s3_faults.counts().statuses.get(412) == 1
    # The tag it returned is good for the next conditional write.
    store.write_bytes("LATEST", b"generation 3", if_match=tag)
    assert direct.read_bytes("LATEST") == b"generation 3"


@pytest.mark.parametrize("fault", ["none", "error500", "reset", "lost_response"])
def test_another_writers_object_is_still_a_conflict(
    fault: str, store: S3Storage, direct: S3Storage, s3_faults: FaultProxy
) -> None:
    direct.write_bytes("LATEST", b"theirs")
    if fault != "none":
        s3_faults.add_rule(fault, method="PUT", times=1)
    with pytest.raises(PreconditionFailed):
        store.write_bytes("LATEST", b"mine", if_none_match=True)
    stale = direct.head("LATEST")
    assert stale is not None
    direct.write_bytes("LATEST", b"theirs, newer")
    with pytest.raises(PreconditionFailed):
        store.write_bytes("LATEST", b"mine", if_match=stale.etag)
    assert direct.read_bytes("LATEST") == b"theirs, newer"


# --------------------------------------------------------------------------- the proxy


def raw(proxy: FaultProxy) -> http.client.HTTPConnection:
    url = urlparse(proxy.endpoint)
    return http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)


def test_reset_is_a_reset_on_the_wire(s3_faults: FaultProxy, bucket: str) -> None:
    s3_faults.add_rule("reset", times=1)
    conn = raw(s3_faults)
    conn.request("GET", f"/{bucket}?list-type=2")
    with pytest.raises(ConnectionResetError):
        conn.getresponse()
    conn = raw(s3_faults)  # the next one is forwarded
    conn.request("GET", f"/{bucket}?list-type=2")
    assert conn.getresponse().status == 200


def test_lost_response_writes_then_resets(
    s3_faults: FaultProxy, bucket: str, direct: S3Storage
) -> None:
    s3_faults.add_rule("lost_response", method="PUT", times=1)
    conn = raw(s3_faults)
    conn.request("PUT", f"/{bucket}/unit/lost", body=PAYLOAD)
    with pytest.raises(ConnectionResetError):
        conn.getresponse()
    assert direct.read_bytes("lost") == PAYLOAD
    assert s3_faults.counts().statuses == {200: 1}


def test_errors_are_s3_errors(s3_faults: FaultProxy, bucket: str) -> None:
    s3_faults.add_rule("error500", times=1)
    s3_faults.add_rule("slowdown503", times=1)
    for status, code in ((500, b"<Code>InternalError</Code>"), (503, b"<Code>SlowDown</Code>")):
        conn = raw(s3_faults)
        conn.request("GET", f"/{bucket}/unit/x")
        resp = conn.getresponse()
        assert resp.status == status
        assert code in resp.read()
        assert resp.getheader("Connection") == "close"
    assert s3_faults.counts().forwarded == 0


def test_a_chunked_body_is_forwarded_as_sent(
    s3_faults: FaultProxy, bucket: str, direct: S3Storage
) -> None:
    conn = raw(s3_faults)
    parts = [PAYLOAD[:1000], PAYLOAD[1000:1001], PAYLOAD[1001:]]
    conn.request("PUT", f"/{bucket}/unit/chunked", body=iter(parts), encode_chunked=True)
    assert conn.getresponse().status == 200
    assert direct.read_bytes("chunked") == PAYLOAD


def test_read_body_keeps_the_chunked_framing_and_trailers() -> None:
    import io
    from email.message import Message

    wire = b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nx-amz-checksum-crc32: AAAAAA==\r\n\r\n"
    headers = Message()
    headers["Transfer-Encoding"] = "chunked"
    stream = io.BytesIO(wire + b"GET /next HTTP/1.1\r\n")
    assert read_body(stream, headers) == wire
    headers = Message()
    headers["Content-Length"] = "3"
    assert read_body(io.BytesIO(b"abcdef"), headers) == b"abc"


def test_rules_come_first_and_count_down(s3_server: str) -> None:
    with FaultProxy(s3_server, p=0.0) as proxy:
        proxy.add_rule("error500", method="PUT", path=r"/LATEST$", times=2)
        proxy.add_rule(None, path=r"/exempt")  # never faulted
        proxy.add_rule("reset", header="If-Match", times=1)
        proxy.configure(p=1.0, kinds=("slowdown503",))
        assert proxy._decide("PUT", "/b/x/LATEST") == "error500"
        assert proxy._decide("GET", "/b/x/LATEST") == "slowdown503"
        assert proxy._decide("PUT", "/b/x/LATEST") == "error500"
        assert proxy._decide("PUT", "/b/x/LATEST") == "slowdown503"
        assert proxy._decide("PUT", "/b/exempt/LATEST") is None
        assert proxy._decide("PUT", "/b/x/y", {"if-none-match"}) == "slowdown503"
        assert proxy._decide("PUT", "/b/x/y", {"if-match"}) == "reset"
        assert proxy._decide("PUT", "/b/x/y", {"if-match"}) == "slowdown503"
    with pytest.raises(ValueError, match="unknown fault"):
        FaultProxy(s3_server).add_rule("teapot")
