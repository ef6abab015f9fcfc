"""``fedrec-client data check``: what a partner's log will contribute, before it joins a run.

Reads the log with the same loader the ClientApp uses, maps it onto the published catalogue
and reports rows kept and dropped (with reasons), catalogue coverage and how many users
land in each leave-one-out split. Nothing leaves the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.ledger_file import refuse_what_is_not_a_ledger
from client.partner_policy import catalogue_pin, check_node_config, refuse_a_cap_without_ledger
from common.data.catalogue import catalogue_fingerprint, load_catalogue
from common.data.loaders import load_interactions
from common.data.sequences import MIN_INTERACTIONS, build_sequences
from common.errors import ConfigError


# Share of a log's rows outside the catalogue (data check) or the served model's (recommend, serve)
# that is more likely a mistake (another federation's catalogue or ids) than new items
MISMATCH_WARNING = 0.2


@dataclass(frozen=True)
class DataReport:
    """Counts for one partner log (interactions = rows, users, items are distinct ids)."""

    source: str
    rows: int
    dropped: dict[str, int]
    log_items: int
    catalogue_items: int
    catalogue_fingerprint: str
    known_items: int  # distinct log items that are in the catalogue
    covered_items: int  # catalogue items in the kept users' sequences
    users: int  # users kept (>= MIN_INTERACTIONS interactions with catalogue items): each has 1 validation + 1 test item
    train_users: int  # users with a training example: two training items or more (the DP population)
    train_interactions: int
    own_catalogue: bool = False  # no catalogue given: the log's own items stood for it

    def lines(self) -> list[str]:
        """The report as printed, one fact per line."""
        # every count is of rows but short-user's, which counts users (a partner journey: read as rows)
        drops = ", ".join(f"{v} {k}" if k != "short-user" else f"{v} short-user (users, not rows)"
                          for k, v in sorted(self.dropped.items())) or "none"
        return [
            f"log: {self.source}",
            f"rows read: {self.rows}; dropped: {drops}",
            f"catalogue: {self.catalogue_items} items (fingerprint {self.catalogue_fingerprint}; node config "
            f"catalogue-fingerprint=\"{self.catalogue_fingerprint}\" pins it for every run)",
            f"items in the log: {self.log_items}, of which in the catalogue: {self.known_items}"
            f" ({self.log_items - self.known_items} unknown, their interactions are dropped)",
            f"catalogue coverage: {self.covered_items} of {self.catalogue_items} items"
            f" ({100.0 * self.covered_items / max(self.catalogue_items, 1):.1f}%)",
            f"users kept: {self.users} (at least {MIN_INTERACTIONS} interactions with catalogue items)",
            f"leave-one-out split: train {self.train_users} users with a training example (2+ training items;"
            f" {self.train_interactions} interactions in all),"
            f" validation {self.users} users, test {self.users} users (one item each)",
        ]

    def warnings(self) -> list[str]:
        """Things that do not stop the log from joining but are probably a mistake."""
        if self.own_catalogue:  # "ok" read as ready to join, unchecked against the federation's items (a review)
            return ["warning: no --catalogue, so the log's own items were taken as the catalogue: which of them the "
                    "federation knows is not checked; give the coordinator's published catalogue"]
        unknown = self.dropped.get("unknown-item", 0)
        if self.rows and unknown > MISMATCH_WARNING * self.rows:
            return [f"warning: {100.0 * unknown / self.rows:.0f}% of the rows ({unknown}) are items outside the "
                    f"catalogue ({self.log_items - self.known_items} of the log's {self.log_items} items): check that "
                    "the catalogue is this federation's and that the log uses its item ids"]
        return []


def check_node_config_text(text: str) -> dict[str, Any]:
    """A SuperNode's ``--node-config`` string parsed by Flower's parser and checked as the ClientApp checks it at
    its first message (client/partner_policy.py), plus its ledger-path: a file that is no usable ledger, or a
    folder that does not exist, is refused here instead of at the first round. Reads only; raises one line."""
    from flwr.common.config import parse_config_args  # lazy: data check without it stays light

    try:
        node = dict(parse_config_args([text])) if text.strip() else {}
    except Exception:  # noqa: BLE001 -- Flower's ClickException: a multi-line traceback from flower-supernode
        raise ConfigError(f"--node-config {text!r} is not key=value pairs Flower can read; put text values in double "
                          "quotes inside single quotes, e.g. 'data-path=\"/data/log.csv\" max-epsilon=4.0'") from None
    check_node_config(node)
    refuse_a_cap_without_ledger(node)
    if ledger := str(node.get("ledger-path", "")).strip():
        path = Path(ledger).expanduser()
        if not path.parent.is_dir():
            raise ConfigError(f"node config ledger-path = {ledger}: the folder {path.parent} does not exist")
        refuse_what_is_not_a_ledger(path)
        if not path.exists() and not os.access(path.parent, os.W_OK):
            raise ConfigError(f"node config ledger-path = {ledger}: cannot create the ledger in {path.parent}")
    return node


def check_partner_log(data_path: str | os.PathLike, catalogue_path: str | os.PathLike | None = None,
                      node_config: Mapping[str, Any] | None = None) -> DataReport:
    """Validate a partner's log; raises :class:`~common.errors.DataError` (one line) when unusable.

    Without ``catalogue_path`` the log's own items are the catalogue (coverage is then 100%). With
    ``node_config`` (:func:`check_node_config_text`), its ``catalogue-fingerprint`` must be the catalogue's.
    """
    items = load_catalogue(catalogue_path) if catalogue_path else None
    if items is not None and (pin := catalogue_pin(node_config or {})) and pin != catalogue_fingerprint(items):
        raise ConfigError(f"node config catalogue-fingerprint = {pin}: {catalogue_path} has fingerprint "
                          f"{catalogue_fingerprint(items)}; this SuperNode would refuse runs on that catalogue")
    log = load_interactions(data_path)
    data = build_sequences(log, items, name=log.source)
    catalogue = data.catalogue
    log_items = set(np.unique(log.item).tolist())
    known = log_items & set(catalogue.tolist())
    train = data.train_sequences()
    return DataReport(
        source=log.source,
        rows=len(log) + sum(v for k, v in log.dropped.items()),
        dropped=dict(data.dropped),
        log_items=len(log_items),
        catalogue_items=len(catalogue),
        catalogue_fingerprint=catalogue_fingerprint(catalogue),
        known_items=len(known),
        covered_items=len(np.unique(np.concatenate(data.sequences))),
        users=data.num_users,
        train_users=len(data.trainable_users()),  # users with a training example (two training items or more)
        train_interactions=int(sum(len(s) for s in train)),
        own_catalogue=items is None,
    )
