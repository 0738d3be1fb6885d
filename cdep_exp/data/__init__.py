"""Dataset builders, one module each; every builder returns a `Splits`."""
