"""Authentication (JWT bearer tokens) and who is calling."""
