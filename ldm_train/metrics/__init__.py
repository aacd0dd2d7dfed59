"""Metrics the trainer needs without importing ``eval`` (Frechet distance from streamed statistics)."""
