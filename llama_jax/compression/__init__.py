"""Model compression: pruning (`masks`, `structured`, `prune`)."""
