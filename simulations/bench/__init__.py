"""Short benchmarks (minutes on a laptop CPU); each prints the numbers the README quotes."""
