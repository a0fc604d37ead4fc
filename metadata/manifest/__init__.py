"""The manifest job: listing, per-file checks, labels, organize, the published manifest, its CLI."""
