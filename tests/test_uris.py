"""URIs as users give them: each refusal checked by the reason a user reads."""

from __future__ import annotations

import pytest

from service.uris import (
    check_http_url,
    check_key_segment,
    check_model_source,
    check_storage_uri,
    has_userinfo,
    parse_s3_uri,
    without_userinfo,
)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://my-bucket/jobs/a/", ("my-bucket", "jobs/a/")),
        ("s3://my-bucket/data/*.jsonl", ("my-bucket", "data/*.jsonl")),
        ("s3://my-bucket", ("my-bucket", "")),
        ("s3://my-bucket/", ("my-bucket", "")),
        ("s3://a.b-c/k?v#f", ("a.b-c", "k?v#f")),  # '?' and '#' belong to the key
    ],
)
def test_parse_s3_uri(uri: str, expected: tuple[str, str]) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("s3://", "names no bucket"),
        ("s3:///key", "names no bucket"),
        ("s3://b/", "'b' is not a valid S3 bucket name"),
        ("s3://My_Bucket/x", "'My_Bucket' is not a valid S3 bucket name"),
        ("s3://bucket-/x", "is not a valid S3 bucket name"),
        ("s3://a..b/x", "is not a valid S3 bucket name"),
        ("s3://192.168.1.1/x", "is not a valid S3 bucket name"),
        ("s3://user@bucket/x", "is not a valid S3 bucket name"),
        ("s3://bucket:9000/x", "is not a valid S3 bucket name"),
        ("s3://bucket/../x", "has a '..' segment"),
        ("s3://bucket/jobs/../x/", "has a '..' segment"),
        ("s3://bucket/./x", "has a '.' segment"),
        ("s3://bucket//x", "has an empty segment"),
        ("s3://bucket/a//b", "has an empty segment"),
        ("s3://bucket/a\nb", "control character '\\n'"),
        ("s3://bucket/a\udcffb", "not valid UTF-8"),
        ("s3://bucket/" + "k" * 1025, "longer than 1024 bytes"),
        ("ftp://bucket/x", "is not an s3:// URI"),
    ],
)
def test_parse_s3_uri_refuses(uri: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_s3_uri(uri)
    assert reason in str(info.value)


def test_dot_dot_segment_says_why() -> None:
    with pytest.raises(ValueError) as info:
        parse_s3_uri("s3://bucket/../x")
    assert str(info.value) == (
        "the S3 key has a '..' segment: S3 keeps it as part of the object's name instead of "
        "resolving it; write the prefix out in full"
    )


@pytest.mark.parametrize(
    "uri",
    ["/data/out", "./out", "../shared/out", "~/out", "out", "s3://bucket/prefix/", "a b/c"],
)
def test_storage_uri_accepts_paths_and_s3(uri: str) -> None:
    assert check_storage_uri(uri) == uri


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("ftp://host/path", "unsupported scheme 'ftp://': use a local path or s3://bucket/prefix"),
        ("file:///tmp/x", "unsupported scheme 'file://'"),
        ("https://bucket.s3.amazonaws.com/x", "unsupported scheme 'https://'"),
        ("S3://bucket/x", "write the scheme in lower case: s3://"),
        ("s3:bucket/x", "'s3:' without '//'"),
        ("s3://", "names no bucket"),
        ("s3://bucket/../x", "has a '..' segment"),
        ("", "is empty"),
        ("   ", "is empty"),
        ("/tmp/a\x00b", "control character '\\x00'"),
    ],
)
def test_storage_uri_refuses(uri: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        check_storage_uri(uri)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    "source", ["mistralai/Mistral-7B-v0.1", "gpt2", "/models/m", "../m", "s3://bucket/m/"]
)
def test_model_source_accepts_dirs_s3_and_hub_ids(source: str) -> None:
    assert check_model_source(source) == source


def test_model_source_refuses_other_schemes_naming_the_three_forms() -> None:
    with pytest.raises(ValueError) as info:
        check_model_source("hf://org/name")
    assert str(info.value) == (
        "unsupported scheme 'hf://': use a local directory, s3://bucket/prefix/ or a Hugging "
        "Face Hub id such as org/name"
    )


@pytest.mark.parametrize(
    "url",
    ["http://pushgateway:9091", "https://pg.example.com/prefix", "http://127.0.0.1:9091/"],
)
def test_http_url_accepts(url: str) -> None:
    assert check_http_url(url) == url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("pushgateway:9091", "use an http:// or https:// URL"),
        ("ftp://host", "use an http:// or https:// URL"),
        ("http://", "names no host"),
        ("http://:9091", "names no host"),
        ("http://host:99999", "not a valid URL"),
        ("http://host:port", "not a valid URL"),
        ("http://[::1", "not a valid URL"),
        ("http://u:p@host", "credentials in a URL are not allowed"),
        ("http://host/?x=1", "no query"),
        ("http://host/#f", "no query"),
    ],
)
def test_http_url_refuses(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        check_http_url(url)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("url", "has", "safe"),
    [
        ("http://user:pw@host:9091/x", True, "http://host:9091/x"),
        ("https://user@host", True, "https://host"),
        ("http://host/a@b", False, "http://host/a@b"),
        ("http://host?a=b@c", False, "http://host?a=b@c"),
    ],
)
def test_userinfo_is_found_and_removed(url: str, has: bool, safe: str) -> None:
    assert has_userinfo(url) is has
    assert without_userinfo(url) == safe


@pytest.mark.parametrize("name", ["job-uid-1234", "a.b", "Run_1"])
def test_key_segment_accepts(name: str) -> None:
    assert check_key_segment(name) == name


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", ""])
def test_key_segment_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        check_key_segment(name)
