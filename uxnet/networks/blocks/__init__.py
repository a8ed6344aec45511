"""The blocks the networks are built of."""
