"""Code shared by server, client and simulations: data, models, metrics, privacy math."""
