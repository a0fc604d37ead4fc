"""The on-disk and in-memory contracts every stage shares (pure Python, no Spark)."""
