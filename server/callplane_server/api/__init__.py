"""gRPC layer: thin servicers translating proto ↔ domain, and errors → google.rpc.Status."""
