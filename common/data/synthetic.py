"""A deterministic synthetic interaction log with structure a sequential recommender can learn.

Users have latent tastes over a few topics; items belong to topics with long-tail
(Zipf) popularity; each item has a preferred successor within its topic, so the next
item is predictable from the last one (sequential dynamics); timestamps increase along
each user's sequence.
"""

from __future__ import annotations

import numpy as np

from common.data.loaders import Interactions


def generate_synthetic(
    *,
    num_users: int = 1000,
    num_items: int = 300,
    num_topics: int = 8,
    mean_length: int = 30,
    successor_prob: float = 0.6,
    seed: int = 0,
) -> Interactions:
    """Generate an interaction log; the same arguments always give the same log."""
    rng = np.random.default_rng(seed)
    topic_of = rng.integers(0, num_topics, size=num_items)
    # Long-tail popularity within the whole catalogue.
    popularity = 1.0 / np.arange(1, num_items + 1) ** 1.0
    popularity = popularity[rng.permutation(num_items)]
    members = [np.flatnonzero(topic_of == t) for t in range(num_topics)]
    members = [m if len(m) else np.arange(num_items) for m in members]
    successor = np.empty(num_items, dtype=np.int64)
    for m in members:
        cycle = rng.permutation(m)  # each topic's items form one cycle of successors
        successor[cycle] = np.roll(cycle, -1)
    users, items, stamps = [], [], []
    for u in range(num_users):
        taste = rng.dirichlet(np.full(num_topics, 0.3))
        length = int(np.clip(rng.geometric(1.0 / mean_length), 5, 4 * mean_length))
        seen: set[int] = set()
        t = int(rng.integers(946_684_800, 1_600_000_000))
        prev = -1
        for _ in range(length):
            item = -1
            if prev >= 0 and rng.random() < successor_prob and int(successor[prev]) not in seen:
                item = int(successor[prev])
            else:
                pool = members[int(rng.choice(num_topics, p=taste))]
                weights = popularity[pool].copy()
                weights[[i for i, it in enumerate(pool) if int(it) in seen]] = 0.0
                if weights.sum() <= 0:
                    break
                item = int(rng.choice(pool, p=weights / weights.sum()))
            seen.add(item)
            users.append(str(u + 1))
            items.append(str(item + 1))
            stamps.append(t)
            t += int(rng.integers(60, 86_400))
            prev = item
    return Interactions(
        user=np.array(users, dtype=str),
        item=np.array(items, dtype=str),
        timestamp=np.array(stamps, dtype=np.int64),
        rating=None,
        source=f"synthetic(users={num_users}, items={num_items}, seed={seed})",
    )
