"""Tier backends, installed as ``tiercache.adapters`` (memory, redis, cloudflare_kv)."""

if __name__ != "tiercache.adapters":  # imported as the top-level folder, not through the package
    raise ImportError(
        "the 'adapters' folder is tiercache's tier backends; import them as 'tiercache.adapters' "
        "(for example: from tiercache.adapters.memory import MemoryTier) after "
        "'pip install -e .' or 'pip install tiercache-py'"
    )
