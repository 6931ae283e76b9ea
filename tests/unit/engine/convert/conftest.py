from tests.fixtures_ckpt import tiny_ckpt  # noqa: F401  (session-scoped fixture factory)
