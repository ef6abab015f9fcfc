"""Coordinator side: the ServerApp (strategy, evaluation aggregation, run reports)."""
