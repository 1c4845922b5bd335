"""Generated protobuf and gRPC stubs for callplane.v1 (`make proto`; never edited by hand)."""
