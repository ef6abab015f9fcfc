"""Researcher tools: run, sweep, audit and benchmarks on Flower's simulation engine."""
