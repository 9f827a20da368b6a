// A Cloudflare Worker that serves values tiercache wrote to Workers KV (CloudflareKVTier).
//
// wrangler.toml:
//   [[kv_namespaces]]
//   binding = "CACHE"
//   id = "<the namespace_id CloudflareKVTier writes to>"
//
// GET /<key>  ->  200 with the value (x-cache: fresh | stale), or 404 when absent, foreign or
// past its hard expiry. The Worker never writes: Python owns the entries.

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

export default {
  async fetch(request, env) {
    const key = decodeURIComponent(new URL(request.url).pathname.slice(1));
    if (!key) return new Response("key missing", { status: 400 });
    const fullKey = `${NAMESPACE}:${key}`;
    const found = readEntry(await env.CACHE.get(fullKey, { type: "json" }), fullKey, Date.now() / 1000);
    if (found === null) return new Response("miss", { status: 404, headers: { "x-cache": "miss" } });
    return Response.json(found.value, { headers: { "x-cache": found.state } });
  },
};
