"""Insurance-fund ledger core: a double-entry ledger and exact loss allocation over gRPC."""

__version__ = "0.1.0"
