"""Property-based fuzzing of every RPC (hypothesis): `make test` runs it briefly, `make fuzz` at length."""
