"""Nightly operation: run lock, model registry, champion/challenger, predict, drift, notify, gc (no luigi)."""
