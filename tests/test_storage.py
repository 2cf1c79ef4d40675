"""cluster.storage against a local directory and the real SeaweedFS S3 server of the local stack."""
from __future__ import annotations

import json
import os
import pickle
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.storage import (
    ChecksumError,
    LocalStore,
    ObjectNotFoundError,
    S3Store,
    StorageError,
    open_store,
    ray_storage,
    sha256_bytes,
)
from tests.fixtures_stack import *  # noqa: F401,F403 -- session fixtures (local_stack, stack_s3, s3_store)
from tests.fixtures_stack import store_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def local_store(tmp_path):
    return open_store(tmp_path / "store")


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return open_store(f"file://{tmp_path / 'store'}")
    return request.getfixturevalue("s3_store")


def _exercise_round_trips(store, tmp_path):
    sha = store.put_bytes("a/b.bin", b"\x00\x01payload")
    assert sha == sha256_bytes(b"\x00\x01payload")
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    store.put_json("a/c.json", {"x": [1, 2], "y": "z"})
    assert store.get_json("a/c.json") == {"x": [1, 2], "y": "z"}

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    store.put_file("files/src.bin", src)
    store.get_file("files/src.bin", tmp_path / "back" / "src.bin")
    assert (tmp_path / "back" / "src.bin").read_bytes() == src.read_bytes()

    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "one.txt").write_text("1")
    (tree / "sub" / "two.txt").write_text("2")
    (tree / "sub" / "deeper" / "three.txt").write_text("3")
    checksums = store.put_tree("run1/tree", tree)
    assert sorted(checksums) == ["one.txt", "sub/deeper/three.txt", "sub/two.txt"]
    out = tmp_path / "tree_out"
    store.get_tree("run1/tree", out)
    assert (out / "sub" / "deeper" / "three.txt").read_text() == "3"

    # list: sorted keys relative to the store; a prefix is a directory ("run1" never matches "run10")
    store.put_bytes("run10/x", b"x")
    assert store.list("run1") == ["run1/tree/one.txt", "run1/tree/sub/deeper/three.txt", "run1/tree/sub/two.txt"]
    assert store.list() == sorted(store.list())
    assert store.exists("run10/x") and not store.exists("run10/y")

    child = store.child("run1")
    assert child.list("tree/sub") == ["tree/sub/deeper/three.txt", "tree/sub/two.txt"]
    assert child.uri_for("tree/one.txt") == store.uri_for("run1/tree/one.txt")

    # publish_json: final key only, no temporary key left visible
    store.publish_json("run1/manifest.json", {"ok": True})
    assert store.get_json("run1/manifest.json") == {"ok": True}
    assert not any("tmp" in key for key in store.list())

    assert store.delete_prefix("run1") == 4
    assert store.list("run1") == [] and store.exists("run10/x")
    store.delete("run10/x")
    store.delete("run10/x")  # deleting a missing key is fine
    with pytest.raises(ObjectNotFoundError):
        store.get_bytes("run10/x")


def test_round_trips(any_store, tmp_path):
    _exercise_round_trips(any_store, tmp_path)


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/etc/passwd", "", "a/.x.densenas-sha256"])
def test_keys_that_escape_the_prefix_are_refused(local_store, key):
    with pytest.raises(StorageError):
        local_store.put_bytes(key, b"x")
    with pytest.raises(StorageError):
        local_store.get_bytes(key)


def test_child_prefix_escape_refused(local_store):
    with pytest.raises(StorageError, match=r"\.\."):
        local_store.child("../outside")


def test_local_checksum_mismatch_detected(local_store):
    local_store.put_bytes("m.json", b'{"a": 1}')
    (local_store.root / "m.json").write_bytes(b'{"a": 2}')  # bit rot / an edit behind the store's back
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        local_store.get_json("m.json")
    assert local_store.get_json("m.json", verify=False) == {"a": 2}


def test_s3_checksum_mismatch_detected(s3_store, tmp_path):
    s3_store.put_bytes("obj.bin", b"original")
    # overwrite the bytes but keep the recorded checksum: what silent corruption looks like to a reader
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key=s3_store._key("obj.bin"))
    assert head["Metadata"]["sha256"] == sha256_bytes(b"original")  # x-amz-meta-sha256 kept by SeaweedFS
    s3_store.client.put_object(Bucket=s3_store.bucket, Key=s3_store._key("obj.bin"), Body=b"tampered",
                               Metadata=head["Metadata"])
    with pytest.raises(ChecksumError):
        s3_store.get_bytes("obj.bin")
    with pytest.raises(ChecksumError):
        s3_store.get_file("obj.bin", tmp_path / "obj.bin")
    assert not (tmp_path / "obj.bin").exists()  # a failed verification leaves no file behind


def test_parquet_through_pyarrow_fs(any_store):
    fs, base = any_store.pyarrow_fs()
    table = pa.table({"id": list(range(100)), "label": [i % 10 for i in range(100)]})
    fs.create_dir(f"{base}/shards")  # pyarrow's local filesystem does not create parents on write
    pq.write_table(table, f"{base}/shards/part-0.parquet", filesystem=fs)
    assert any_store.list("shards") == ["shards/part-0.parquet"]
    assert pq.read_table(f"{base}/shards/part-0.parquet", filesystem=fs).equals(table)
    # written by pyarrow: no recorded checksum, still readable through the store
    assert any_store.get_bytes("shards/part-0.parquet")[:4] == b"PAR1"


def test_ray_storage_args(local_store, s3_store):
    path, fs = ray_storage(local_store)
    assert path == str(local_store.root) and fs is None
    path, fs = ray_storage(s3_store)
    assert path == f"{s3_store.bucket}/{s3_store.prefix}" and fs.type_name == "s3"
    fs.create_dir(f"{path}/ckpt")
    with fs.open_output_stream(f"{path}/ckpt/state.txt") as handle:
        handle.write(b"epoch=1")
    assert s3_store.get_bytes("ckpt/state.txt") == b"epoch=1"


def test_s3_store_pickles_for_ray(s3_store):
    s3_store.put_bytes("p.txt", b"p")
    clone = pickle.loads(pickle.dumps(s3_store))
    assert clone.get_bytes("p.txt") == b"p"


def test_s3_wrong_credentials_refused(stack_s3):
    creds = stack_s3.credentials()
    bad = open_store(f"s3://{stack_s3.bucket}/x", endpoint_url=stack_s3.s3_endpoint,
                     access_key=creds["access_key"], secret_key="not-the-secret")
    with pytest.raises(StorageError, match="refused the credentials"):
        bad.put_bytes("k", b"v")
    unknown = open_store(f"s3://{stack_s3.bucket}/x", endpoint_url=stack_s3.s3_endpoint,
                         access_key="nobody", secret_key="nothing")
    with pytest.raises(StorageError, match="credentials"):
        unknown.list()


def test_s3_missing_bucket_is_explained(stack_s3):
    store = store_for(stack_s3, "x")
    store.bucket = "no-such-bucket"  # buckets are not auto-created by the server
    with pytest.raises(StorageError, match="does not exist"):
        store.put_bytes("k", b"v")


def test_unreachable_endpoint_fails_fast():
    # refused connections: retried with backoff, then a clear error
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    store = open_store("s3://densenas/x", endpoint_url=f"http://127.0.0.1:{dead_port}", access_key="a", secret_key="b")
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        store.get_bytes("k")
    assert time.monotonic() - started < 30

    # a server that accepts and never answers (the case that hangs naive clients)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        store = open_store("s3://densenas/x", endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
                           access_key="a", secret_key="b")
        started = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
            store.put_bytes("k", b"v")
        elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.1f} s"


def test_object_survives_server_restart(stack_s3):
    store = store_for(stack_s3, "restart")
    store.put_json("kept.json", {"survives": True})
    stack_s3.down(("s3",))
    with pytest.raises(StorageError):
        store.get_json("kept.json")
    stack_s3.up(("s3",))
    assert store.get_json("kept.json") == {"survives": True}


def test_open_store_dispatch(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and s3.uri_for("k") == "s3://bucket/some/prefix/k"
    with pytest.raises(StorageError, match="scheme"):
        open_store("gs://bucket/x")
