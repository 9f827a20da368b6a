// A Cloudflare Worker that serves values tiercache wrote to Workers KV (CloudflareKVTier).
//
// wrangler.toml:
//   [[kv_namespaces]]
//   binding = "CACHE"
//   id = "<the namespace_id CloudflareKVTier writes to>"
//   [vars]                       # only with TieredCache(codec=SignedCodec([...])):
//   TIERCACHE_SIGNING_KEYS = ""  # set it as a secret: `wrangler secret put TIERCACHE_SIGNING_KEYS`
//                                # (the SignedCodec keys, hex, comma-separated)
//
// GET /<key>  ->  200 with the value (x-cache: fresh | stale), or 404 when absent, not a
// tiercache envelope (not even JSON), foreign, past its hard expiry, or signed and failing
// verification. Records written with SignedCodec are verified with TIERCACHE_SIGNING_KEYS when it
// is set (HMAC-SHA256, as tiercache/signing.py describes); without it their body is trusted as
// KV holds it. Only JSON bodies ("fmt":"j") can be read here. The Worker never writes.

const NAMESPACE = "app"; // TieredCache(namespace=...): KV keys are "<namespace>:<key>"

/**
 * Check a parsed tiercache envelope (format 1) against the key it was read under and the time.
 * Returns {state: "fresh" | "stale", value} or null (a miss).
 */
export function readEntry(entry, fullKey, nowSeconds) {
  if (entry === null || typeof entry !== "object") return null;
  if (entry.tc !== 1) return null;           // not a tiercache envelope (or a newer format)
  if (entry.k !== fullKey) return null;      // a hashed long key collided: not ours
  if (!(nowSeconds < entry.s)) return null;  // past stale_until: dead, whatever KV still holds
  return { state: nowSeconds < entry.f ? "fresh" : "stale", value: entry.v };
}

// SignedCodec's record: a fixed header, the body as stored, "}" (tiercache/signing.py).
const SIGNED_HEADER = /^\{"tcs":1,"kid":"([0-9a-f]{8})","fmt":"([jbp])","sig":"([0-9a-f]{64})","body":/;
const encoder = new TextEncoder();

function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch {
    return null; // not JSON: not something tiercache wrote
  }
}

async function hmacHex(keyBytes, message) {
  const key = await crypto.subtle.importKey("raw", keyBytes, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const mac = new Uint8Array(await crypto.subtle.sign("HMAC", key, message));
  return Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join("");
}

function sameText(a, b) { // compares every character, whatever the first difference
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

function hexBytes(hex) {
  const clean = hex.trim();
  if (!/^([0-9a-fA-F]{2})+$/.test(clean)) throw new Error("TIERCACHE_SIGNING_KEYS: hex keys, comma-separated");
  return Uint8Array.from(clean.match(/../g), (h) => parseInt(h, 16));
}

/**
 * The envelope in a KV value's text: parsed as is, or out of a SignedCodec record (verified when
 * `keys`, a list of key bytes, is not empty). null when it is neither, or fails verification.
 */
export async function openRecord(text, keys) {
  if (text === null) return null;
  const header = SIGNED_HEADER.exec(text);
  if (header === null) return parseJson(text);
  const [prefix, kid, fmt, sig] = header;
  if (fmt !== "j" || !text.endsWith("}")) return null; // base64 or pickle bodies: not for JS
  const body = text.slice(prefix.length, -1);
  if (keys.length) {
    const signed = encoder.encode(`tiercache-signed\x001\x00${fmt}\x00${body}`);
    let verified = false;
    for (const key of keys) {
      if ((await hmacHex(key, encoder.encode("tiercache key id"))).slice(0, 8) !== kid) continue;
      verified = sameText(await hmacHex(key, signed), sig);
      break;
    }
    if (!verified) return null;
  }
  return parseJson(body);
}

export default {
  async fetch(request, env) {
    const key = decodeURIComponent(new URL(request.url).pathname.slice(1));
    if (!key) return new Response("key missing", { status: 400 });
    const fullKey = `${NAMESPACE}:${key}`;
    const keys = (env.TIERCACHE_SIGNING_KEYS || "").split(",").filter((k) => k.trim()).map(hexBytes);
    const entry = await openRecord(await env.CACHE.get(fullKey, { type: "text" }), keys);
    const found = readEntry(entry, fullKey, Date.now() / 1000);
    if (found === null) return new Response("miss", { status: 404, headers: { "x-cache": "miss" } });
    return Response.json(found.value, { headers: { "x-cache": found.state } });
  },
};
