"""The run's privacy report: privacy.json (per partner mechanism and final epsilon) and the guarantee sentence.

Partners report their ledger's numbers in each training reply (MetricRecord ``metrics``) and
who they are in a ConfigRecord ``privacy``; a partner that refuses to train (budget
exhausted, too small) replies with an error, which is logged here and listed per partner.
Central DP adds the organisation-level epsilon of Flower's accountant after each round.
The guarantee's prose is in server/guarantee_text.py.
"""

from __future__ import annotations

import json
import math
import re
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from common.files import atomic_write_bytes
from common.privacy import central_epsilon_per_user, default_delta, dp_mode, uses_central_dp, uses_local_dp
from server.guarantee_text import GuaranteeText

# A partner's budget refusal states its whole-ledger spend (client/privacy_budget.py, common/privacy.py)
# Errors the SuperLink makes for a message it could not deliver, or whose reply expired: not a partner's refusal
NOT_DELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)
_REFUSED_SPEND = re.compile(r"budget exhausted: epsilon (\d+(?:\.\d+)?) of ")
SPEND_KEYS = ("epsilon", "ledger-steps", "ledger-rounds", "ledger-evaluations")  # only grow (PrivacyReport._record)
# Numbers a partner reports per round (client/privacy_budget.py PartnerBudget.metrics)
PARTNER_METRICS = ("epsilon", "delta", "target-epsilon", "noise-multiplier", "sample-rate",
                   "ledger-steps", "ledger-rounds", "ledger-evaluations", "dp-users", "num-examples")


class PrivacyReport(GuaranteeText):
    """Collects every partner's privacy numbers and refusals; writes ``privacy.json`` after each round.
    The guarantee sentence (:meth:`guarantee`) is written by :class:`server.guarantee_text.GuaranteeText`."""

    def __init__(self, run_dir: Path, cfg: dict[str, Any]) -> None:
        self.path = run_dir / "privacy.json"
        self.cfg = cfg
        self.mode = dp_mode(cfg)
        self.partners: dict[str, dict[str, Any]] = {}
        self.node_labels: dict[int, str] = {}
        self.central: dict[str, Any] = {}
        self.central_rounds: list[dict[str, Any]] = []
        # The rounds the partners' local noise was calibrated for: fixed when the run started (their
        # ledgers keep that calibration), so a resume with another num-server-rounds does not change it
        self.planned_rounds = int(cfg["num-server-rounds"])
        self.start_model: dict[str, Any] | None = None  # init-model (server/warm_start.py)
        self.resumed_after: list[int] = []  # rounds after which a stopped run was resumed
        self.restored_labels: set[str] = set()  # labels listed before this process started (a resume)
        self._load_earlier()

    def _load_earlier(self) -> None:
        """A resumed run (same directory) continues its report: central releases already made
        stay accounted (server/central_dp.py replays them), partners' history stays listed."""
        if not self.path.is_file():
            return
        try:
            earlier = json.loads(self.path.read_text())
        except (OSError, ValueError):
            log(WARNING, "%s is unreadable; the run's checkpoint copy is used on resume (partners' ledgers are "
                "unaffected)", self.path)
            return
        self._apply(earlier)

    def adopt_checkpoint_copy(self, copy: dict[str, Any] | None) -> None:
        """Resuming: take the checkpoint's copy of privacy.json when the file is missing, unreadable
        or records fewer central releases, so no release made before the resume is forgotten."""
        if not isinstance(copy, dict):
            return
        rounds = copy.get("central", {}).get("rounds", [])
        if len(rounds) > len(self.central_rounds) or (copy.get("partners") and not self.partners):
            log(WARNING, "%s is missing or behind the checkpoint (%d central releases there, %d here); "
                "continuing from the checkpoint's copy", self.path, len(rounds), len(self.central_rounds))
            self._apply(copy)

    def _apply(self, earlier: dict[str, Any]) -> None:
        self.partners = dict(earlier.get("partners", {}))
        self.node_labels = {int(p["node-id"]): label for label, p in self.partners.items() if "node-id" in p}
        self.restored_labels = set(self.partners)
        central = dict(earlier.get("central", {}))
        self.central_rounds = list(central.pop("rounds", []))
        self.central = central
        self.planned_rounds = int(earlier.get("local", {}).get("planned-rounds", self.planned_rounds))
        self.start_model = earlier.get("init-model") or self.start_model
        self.resumed_after = [int(r) for r in earlier.get("resumed-after", self.resumed_after)]

    def note_resumed(self, after_round: int) -> None:
        """The run continues after a stop: updates partners sent in the round after ``after_round``
        may have reached the coordinator before it stopped; the guarantee says so (a review)."""
        if after_round not in self.resumed_after:
            self.resumed_after.append(after_round)

    def note_start_model(self, record: dict[str, Any]) -> None:
        """The run starts from a released model (``init-model``): listed, and named in the guarantee."""
        self.start_model = dict(record)

    # -- fed by the strategy wrappers (server/central_dp.py) ----------------------------------
    def screen(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Record accepted replies' privacy numbers, log refusals; returns the replies without errors."""
        valid = [m for m in replies if not m.has_error()]
        for msg in replies:
            if msg.has_error():
                self._refused(server_round, msg)
        labels = self._round_labels(server_round, valid)
        for msg in valid:
            self._record(msg, labels[id(msg)]).setdefault("rounds-trained", []).append(server_round)
        return valid

    def _round_labels(self, server_round: int, replies: list[Message]) -> dict[int, str]:
        """Each reply's label; one partner answers once per round, so two nodes with one label (the same
        data-identity or event store; a plain log's label is keyed per partner) are two partners: the label's known node keeps it, the other is
        listed as ``label@node-<id>``, so neither's epsilon overwrites the other's (a review)."""
        nodes: dict[str, list[int]] = {}
        out = {}
        for msg in replies:
            label, node = self._label(msg), int(msg.metadata.src_node_id)
            if self._known_label(msg) != label:  # listed apart before: stays apart
                out[id(msg)] = self._known_label(msg)
            else:
                nodes.setdefault(label, []).append(node)
        for msg in replies:
            label, node = self._label(msg), int(msg.metadata.src_node_id)
            if id(msg) in out:
                continue
            clash = sorted(set(nodes[label]))
            if len(clash) > 1:
                owner = self.partners.get(label, {}).get("node-id")
                known = [n for n in clash if self.node_labels.get(n) == label]
                keeper = owner if owner in clash else known[0] if known else nodes[label][0]
                if node != keeper:
                    log(WARNING, "round %d: nodes %s all report %s (the same data-identity); node %d is "
                        "listed apart as %s@node-%d: give each partner its own data-identity", server_round,
                        clash, label, node, label, node)
                    label = f"{label}@node-{node}"
            out[id(msg)] = label
        return out

    def _known_label(self, msg: Message) -> str:
        """The label the reply's node is listed under: its reply's, ``label@node-<id>`` once listed apart, or
        in a resumed run the one it had before the stop when its new label is unknown: a partner without a
        ledger keys its label with a secret of its Flower run, which a resume renews (it was listed twice)."""
        label, node = self._label(msg), int(msg.metadata.src_node_id)
        known = self.node_labels.get(node)
        if known == f"{label}@node-{node}":
            return known
        if known and known != label and known in self.restored_labels and label not in self.partners:
            return known
        return label

    @staticmethod
    def _label(msg: Message) -> str:
        details = msg.content.config_records.get("privacy")
        return str(details.get("partner")) if details and details.get("partner") else f"node-{int(msg.metadata.src_node_id)}"

    def note_evaluation(self, server_round: int, replies: list[Message]) -> None:
        """Noised evaluation replies (``evaluation-noise-multiplier`` > 0) spend from the partners'
        ledgers too: their privacy numbers update the partner's entry (epsilon only grows)."""
        noted = False
        for msg in replies:
            if msg.has_error():  # a refusal (share-evaluation, budget): as visible as a training refusal
                node = int(msg.metadata.src_node_id)
                label = self.node_labels.get(node, f"node-{node}")
                if msg.error.code in NOT_DELIVERED:  # the SuperLink's error (unreachable, expired): no refusal
                    log(WARNING, "round %d: %s did not answer its evaluation (%s); if it sent noised sums, the "
                        "spend is in its own ledger only", server_round, label, msg.error.reason)
                    continue
                log(WARNING, "round %d: %s refused to evaluate: %s", server_round, label, msg.error.reason)
                entry = self.partners.setdefault(label, {"partner": label, "node-id": node})
                entry.setdefault("refused-evaluation", []).append({"round": server_round, "reason": msg.error.reason})
                noted = True
                continue
            if "privacy" not in msg.content.config_records:
                continue  # sums sent in clear: nothing spent
            before = dict(self.partners.get(self._known_label(msg), {}))
            entry = self._record(msg)
            if "num-examples" in before:  # the training's count, not the evaluated users
                entry["num-examples"] = before["num-examples"]
            entry.setdefault("rounds-evaluated", []).append(server_round)
            noted = True
        if noted:
            self.write()

    def note_item_histograms(self, replies: list[Message], unanswered: list[int]) -> None:
        """The partners' answers to the ``item-prior = "popularity"`` query (server/item_prior.py), round 0: a
        histogram is a DP release on the partner's ledger, so its numbers count even if the partner never
        trains; a refusal is listed (its stated spend read as a training refusal's); a partner that did not
        answer may have released one (its ledger is the record)."""
        for msg in replies:
            if msg.has_error():
                self._refused(0, msg, "send its item histogram")
            else:
                self._record(msg)["item-histogram"] = "released before round 1"
        for node in unanswered:
            self.note_unanswered(0, node)
        self.write()

    def _refused(self, server_round: int, msg: Message, what: str = "train") -> None:
        """An error reply (a refusal such as an exhausted budget, or a failure): logged and listed
        under ``refused``; named ``node-<id>`` until the partner has sent a reply with its label. An error
        the SuperLink made (the partner unreachable, its reply expired) is no refusal: the partner may have
        trained, so it is listed under ``no-reply``, its ledger the record."""
        node = int(msg.metadata.src_node_id)
        if msg.error.code in NOT_DELIVERED:
            log(WARNING, "round %d: %s did not answer (%s); if it trained, the spend is in its own ledger only",
                server_round, self.node_labels.get(node, f"node-{node}"), msg.error.reason)
            self.note_unanswered(server_round, node)
            return
        label = self.node_labels.get(node, f"node-{node}")
        log(WARNING, "round %d: %s refused to %s: %s", server_round, label, what, msg.error.reason)
        entry = self.partners.setdefault(label, {"partner": label, "node-id": node})
        entry.setdefault("refused", []).append({"round": server_round, "reason": msg.error.reason})
        # An exhausted budget states the ledger's whole spend, which may include updates this report never
        # saw (sent before a coordinator crash, then the round redone): the entry's epsilon never stays below
        # it. Paired with the partner's delta, else the run's (a partner's delta is never above the run's).
        found = _REFUSED_SPEND.search(str(msg.error.reason))
        if found and float(found.group(1)) > float(entry.get("epsilon", -1.0)):
            entry["epsilon"] = float(found.group(1))
            # (target-delta 0: partners default to min(1e-5, 0.1 / users), at most 1e-5)
            entry.setdefault("delta", float(self.cfg["target-delta"]) or default_delta(1))
            entry["epsilon-from"] = f"refusal in round {server_round}"

    def _adopt_provisional(self, node: int, label: str) -> dict[str, Any]:
        """``label``'s entry, holding what was listed under ``node-<id>`` before the node's first labelled reply
        (a refusal of the round-0 query, a missing answer): one partner, one entry (it was listed twice)."""
        entry = self.partners.setdefault(label, {"partner": label, "node-id": node})
        provisional = self.partners.get(f"node-{node}")
        if provisional is None or label == f"node-{node}":
            return entry
        del self.partners[f"node-{node}"]
        for key in ("refused", "no-reply", "refused-evaluation"):
            if key in provisional:
                entry[key] = provisional[key] + entry.get(key, [])
        if float(provisional.get("epsilon", -1.0)) > float(entry.get("epsilon", -1.0)):  # a refusal's stated spend
            entry.update({k: provisional[k] for k in ("epsilon", "delta", "epsilon-from") if k in provisional})
        return entry

    def note_unaggregated(self, server_round: int, msg: Message, reason: str) -> None:
        """A reply that reached the coordinator but will not be aggregated (rejected by update
        validation, or its round failed): its update was still released to the coordinator, so its
        privacy numbers count (the partner's ledger has the spend); listed under ``not-aggregated``.
        An error reply in a failed round is a refusal (:meth:`_refused`): it released nothing."""
        if msg.has_error():
            self._refused(server_round, msg)
            self.write()
            return
        entry = self._record(msg)  # (a rejected or late, older reply never lowers the recorded spend: _record)
        entry.setdefault("not-aggregated", []).append({"round": server_round, "reason": reason})
        self.write()

    def note_late(self, server_round: int, msg: Message) -> None:
        """A training reply that came after ``round-timeout`` (server/late_replies.py): not aggregated,
        but released, so its numbers count like a rejected reply's. SecAgg+'s key set-up and
        unmasking replies carry no privacy numbers and are passed over. A late error reply is a refusal."""
        if msg.has_error():
            self._refused(server_round, msg)
            self.write()
            return
        if "privacy" not in msg.content.config_records and not msg.content.metric_records:
            return
        node = int(msg.metadata.src_node_id)
        log(WARNING, "round %d: %s replied after round-timeout: not aggregated, its privacy numbers are recorded",
            server_round, self.node_labels.get(node, f"node-{node}"))
        self.note_unaggregated(server_round, msg, "late: arrived after round-timeout")

    def note_unanswered(self, server_round: int, node: int) -> None:
        """A training message never answered by the end of the run: listed under ``no-reply`` (the
        partner may still have trained; its own ledger is the record)."""
        label = self.node_labels.get(node, f"node-{node}")
        entry = self.partners.setdefault(label, {"partner": label, "node-id": node})
        if server_round not in entry.setdefault("no-reply", []):
            entry["no-reply"].append(server_round)
        self.write()

    def _record(self, msg: Message, label: str | None = None) -> dict[str, Any]:
        """Update the sending partner's entry (``label``, default its reply's) with the reply's privacy
        details and numbers."""
        node = int(msg.metadata.src_node_id)
        details = msg.content.config_records.get("privacy")
        label = label or self._known_label(msg)  # a node listed apart (_round_labels) stays apart
        self.node_labels[node] = label
        entry = self._adopt_provisional(node, label)
        # Spend never goes down under one label: a rejected or late (older) reply, or two nodes reporting one
        # label in different rounds (the same data-identity), keep the largest; the guarantee stays an upper bound
        spent = {k: entry[k] for k in SPEND_KEYS if k in entry}
        created = entry.get("ledger-created") == "true"  # keep "true" once a round created the ledger
        entry.update({k: v for k, v in (details or {}).items() if k != "partner"})
        if created:
            entry["ledger-created"] = "true"
        metrics = next(iter(msg.content.metric_records.values()), None)
        if metrics is not None:  # finite numbers only: a rejected reply may carry anything
            entry.update({k: metrics[k] for k in PARTNER_METRICS
                          if k in metrics and isinstance(metrics[k], (int, float)) and math.isfinite(metrics[k])})
        for key, value in spent.items():
            if float(value) > float(entry.get(key, value)):
                entry[key] = value
        if "epsilon-from" in entry and "epsilon" in spent and float(entry["epsilon"]) > float(spent["epsilon"]):
            del entry["epsilon-from"]  # a reply's own number replaced the one a refusal stated
        return entry

    def note_central(self, server_round: int, *, noise_multiplier: float, clipping_norm: float, clipping: str,
                     partners: int, epsilon: float | None, delta: float | None, sampled: int | None = None) -> None:
        """One round of central DP noise on the aggregate of ``partners`` updates over ``sampled``
        (the fixed denominator, server/central_dp.py); ``epsilon`` from Flower's accountant when it applies."""
        self.central = {"noise-multiplier": noise_multiplier, "clipping-norm": clipping_norm, "clipping": clipping,
                        "accountant": "flower-rdp (no amplification)" if epsilon is not None else "none",
                        "epsilon": epsilon, "delta": delta}
        self.central_rounds.append({"round": server_round, "partners": partners, "sampled": sampled or partners,
                                    "epsilon": epsilon, "noise-multiplier": noise_multiplier})
        if epsilon is not None:
            log(INFO, "round %d: central DP, organisation-level epsilon %.3f (delta %.2g) after %d releases",
                server_round, epsilon, delta, len(self.central_rounds))

    # -- outputs -----------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {
            "dp-mode": self.mode,
            "guarantee": self.guarantee(),
            "unit": "one user's whole interaction history at one partner (local); one partner's whole update (central)",
        }
        if uses_local_dp(self.mode):
            out["local"] = {
                "target-epsilon": cfg["target-epsilon"], "accountant": cfg["accountant"],
                "max-grad-norm": cfg["max-grad-norm"], "batch-size": cfg["batch-size"],
                "local-epochs": cfg["local-epochs"], "planned-rounds": self.planned_rounds,
                "sampling": "poisson",
                # every count a deployed partner's replies carry is computed from this (common/private_count.py)
                "user-count": (f"deployed partners: released once per run plus Gaussian noise of std "
                               f"{float(cfg.get('count-noise-multiplier', 10.0)):g} users, on their ledgers; simulated "
                               "partitions: their size" + (" (noised too: simulated-count-noise)"
                                                           if cfg.get("simulated-count-noise") else "")),
                "evaluation-noise-multiplier": float(cfg.get("evaluation-noise-multiplier", 0.0)),
                "evaluation-sums": self._evaluation_text(),
            }
            if cfg.get("item-prior", "none") == "popularity":  # common/item_prior.py: on the same ledgers
                out["local"]["item-histogram"] = (
                    f"released once per run before round 1 (item-prior = popularity): each user's distinct training "
                    f"items at L2 norm 1 plus Gaussian noise of std {float(cfg['item-prior-noise-multiplier']):g}, "
                    "recorded on the ledger of each partner that sent one and inside its epsilon (a partner "
                    "that declined or could not afford it is listed as refusing in round 0)")
            if int(cfg["num-server-rounds"]) != self.planned_rounds:  # a resume asked for another count
                out["local"]["num-server-rounds"] = cfg["num-server-rounds"]
                out["local"]["note"] = (f"resumed with num-server-rounds {cfg['num-server-rounds']}; the partners' noise "
                                        f"was calibrated for the {self.planned_rounds} rounds first planned, and a "
                                        "partner whose budget is spent refuses the rounds beyond them")
        if self.partners:  # every mode: refusals, and partners that forced their own DP-SGD
            out["partners"] = dict(sorted(self.partners.items()))
        if uses_central_dp(self.mode):
            per_user = central_epsilon_per_user({**self.central, "rounds": self.central_rounds})
            out["central"] = {**self.central, "rounds": self.central_rounds,
                              "epsilon-per-user": per_user[0] if per_user else None,
                              # a privacy review: only local runs said what lies outside their guarantee
                              "outside": "the global models only: metrics.jsonl, summary.md and the plots carry the "
                                         "partners' evaluation results (per-partner NDCG, evaluated users) and their "
                                         "training loss without central noise; keep them with the coordinator"}
        if self.start_model:
            out["init-model"] = self.start_model
        if self.resumed_after:
            out["resumed-after"] = self.resumed_after
        return out

    def write(self) -> Path:
        atomic_write_bytes(self.path, json.dumps(self.as_dict(), indent=2, sort_keys=True).encode())
        return self.path
