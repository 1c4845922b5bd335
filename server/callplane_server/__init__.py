"""Callplane server: a gRPC control plane for video and audio calls."""
