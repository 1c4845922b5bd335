"""Use-case services: the rules of call types, users, calls and members. No SQL, no gRPC."""
