"""Benchmarks (`make bench`): a script, not tests; pytest collects nothing here."""
