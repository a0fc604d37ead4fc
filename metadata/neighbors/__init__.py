"""Feature-space nearest neighbours on Spark (IVF: coarse k-means cells, exact search inside them), the CLI."""
