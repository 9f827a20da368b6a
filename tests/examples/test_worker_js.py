"""examples/worker.js under node, reading envelopes tiercache's codec wrote to a (fake) KV binding."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tiercache import TieredCache
from tiercache.adapters.memory import MemoryTier
from tiercache.signing import SignedCodec
from tiercache.testing import FakeClock, FakeRemoteTier

WORKER = Path(__file__).resolve().parents[2] / "examples" / "worker.js"

# Runs the Worker's fetch() against a KV binding holding the given {key: envelope text}.
DRIVER = """
import worker from %(worker)s;
const store = %(store)s;
const env = { ...%(vars)s, CACHE: { async get(key, opts) {
  if (!(key in store)) return null;
  return opts && opts.type === "json" ? JSON.parse(store[key]) : store[key];
} } };
const out = {};
for (const key of %(keys)s) {
  const res = await worker.fetch(new Request("https://edge.example/" + encodeURIComponent(key)), env);
  out[key] = { status: res.status, cache: res.headers.get("x-cache"), body: await res.text() };
}
console.log(JSON.stringify(out));
"""


def run_worker(
    store: dict[str, str], keys: list[str], env: dict[str, str] | None = None
) -> dict[str, dict[str, object]]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = DRIVER % {
        "worker": json.dumps(WORKER.as_uri()),
        "store": json.dumps(store),
        "keys": json.dumps(keys),
        "vars": json.dumps(env or {}),
    }
    done = subprocess.run(
        [node, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=20, check=True
    )
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def test_worker_reads_tiercache_envelopes() -> None:
    clock = FakeClock()
    kv = FakeRemoteTier(name="kv")
    cache = TieredCache([MemoryTier(), kv], namespace="app", clock=clock, ttl=60, stale_ttl=600)
    cache.sync.set("user:42", {"name": "Ada", "langs": ["en", "fr"]})
    kv.store["app:foreign"] = (json.dumps({"k": "app:foreign", "v": 1}).encode(), clock() + 60)
    kv.store["app:moved"] = (kv.store["app:user:42"][0], clock() + 60)  # envelope of another key
    store = {key: data.decode() for key, (data, _) in kv.store.items()}
    out = run_worker(store, ["user:42", "missing", "foreign", "moved"])
    assert out["user:42"] == {"status": 200, "cache": "fresh", "body": '{"name":"Ada","langs":["en","fr"]}'}
    assert out["missing"]["status"] == 404
    assert out["foreign"]["status"] == 404  # not a tiercache envelope
    assert out["moved"]["status"] == 404  # envelope's key differs from the key read


def test_worker_judges_time_from_the_envelope() -> None:
    # Entries written "in the past" by the fake clock, read by the worker at the real time.
    clock = FakeClock(start=time.time() - 100)
    kv = FakeRemoteTier(name="kv")
    cache = TieredCache([MemoryTier(), kv], namespace="app", clock=clock, ttl=60, stale_ttl=600)
    cache.sync.set("fresh", 1, ttl=3600)
    cache.sync.set("stale", 2, ttl=10)  # fresh until -90 s, stale until +510 s
    cache.sync.set("dead", 3, ttl=10, stale_ttl=10)  # dead since 80 s ago
    store = {key: data.decode() for key, (data, _) in kv.store.items()}
    out = run_worker(store, ["fresh", "stale", "dead"])
    assert out["fresh"] == {"status": 200, "cache": "fresh", "body": "1"}
    assert out["stale"] == {"status": 200, "cache": "stale", "body": "2"}
    assert out["dead"]["status"] == 404


def test_worker_answers_404_to_values_that_are_not_json() -> None:
    out = run_worker({"app:text": "plain text", "app:half": '{"tc":1,'}, ["text", "half"])
    assert out["text"] == {"status": 404, "cache": "miss", "body": "miss"}  # not a 500
    assert out["half"]["status"] == 404


KEY, OLD_KEY, OTHER_KEY = b"k" * 32, b"o" * 32, b"x" * 32


def signed_store(*keys: bytes, pickle: bool = False) -> dict[str, str]:
    kv = FakeRemoteTier(name="kv")
    codec = SignedCodec(list(keys), pickle=pickle)
    cache = TieredCache([MemoryTier(), kv], namespace="app", ttl=60, codec=codec)
    cache.sync.set("user:42", {"name": "Ada", "city": "Zürich"})  # non-ASCII: the MAC is over bytes
    return {key: data.decode() for key, (data, _) in kv.store.items()}


def test_worker_reads_signed_codec_values() -> None:
    store = signed_store(KEY)
    body = '{"name":"Ada","city":"Zürich"}'
    verified = run_worker(store, ["user:42"], {"TIERCACHE_SIGNING_KEYS": KEY.hex()})["user:42"]
    assert verified == {"status": 200, "cache": "fresh", "body": body}
    # rotation: the signing key is second in the Worker's list
    rotated = run_worker(store, ["user:42"], {"TIERCACHE_SIGNING_KEYS": f"{OTHER_KEY.hex()},{KEY.hex()}"})
    assert rotated["user:42"]["status"] == 200
    # no keys configured: the body is read as KV holds it (a Worker that trusts its KV)
    assert run_worker(store, ["user:42"])["user:42"] == verified


def test_worker_refuses_signed_values_that_do_not_verify() -> None:
    store = signed_store(KEY)
    keys = {"TIERCACHE_SIGNING_KEYS": KEY.hex()}
    tampered = {k: v.replace("Ada", "Eve") for k, v in store.items()}
    assert run_worker(tampered, ["user:42"], keys)["user:42"]["status"] == 404
    wrong = {"TIERCACHE_SIGNING_KEYS": OTHER_KEY.hex()}
    assert run_worker(store, ["user:42"], wrong)["user:42"]["status"] == 404
    pickled = signed_store(KEY, pickle=True)  # a pickle body is not for JavaScript
    assert run_worker(pickled, ["user:42"], keys)["user:42"]["status"] == 404
