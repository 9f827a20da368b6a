"""tiercache: multi-tier caching (in-process memory, Redis, Cloudflare KV) with stampede protection."""
