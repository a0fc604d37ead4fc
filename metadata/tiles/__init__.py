"""Jobs over the tile table (``contracts.tiles``): per-image features pooled from tile features."""
