"""The guarantee sentence of the run's privacy report, and the words privacy.json uses for what
partners' evaluation replies release.

A mixin of :class:`server.privacy_report.PrivacyReport`: the report records the numbers, this
turns them into prose (kept apart so each file does one job).
"""

from __future__ import annotations

from typing import Any

from common.privacy import central_epsilon_per_user, stated_epsilon, uses_central_dp, uses_local_dp


class GuaranteeText:
    """The prose of :class:`server.privacy_report.PrivacyReport`; reads the report's recorded state."""

    # Set by PrivacyReport: declared here so the mixin type-checks on its own
    cfg: dict[str, Any]
    mode: str
    partners: dict[str, dict[str, Any]]
    central: dict[str, Any]
    central_rounds: list[dict[str, Any]]
    start_model: dict[str, Any] | None
    resumed_after: list[int]

    def _evaluation_text(self) -> str:
        """What partners' evaluation replies released, in words (privacy.json's ``local``)."""
        noise = float(self.cfg.get("evaluation-noise-multiplier", 0.0))
        k = self.cfg["top-k"]
        if noise <= 0:
            return "sent in clear, outside the guarantee (evaluation-noise-multiplier = 0)"
        return (f"HR@{k} and NDCG@{k} sums only, each plus Gaussian noise of std {noise:g} x sqrt 2 (one user moves "
                f"the pair by at most sqrt 2), accounted on the partners' ledgers in the epsilon above; the count of "
                "evaluated users is a deployed partner's noised user count (on its ledger), a simulated partition's size")

    def _spend_bound(self, p: dict[str, Any]) -> float:
        """A partner's stated epsilon, or its target where a training message of this run went unanswered:
        it may have trained then, and the spend its reply would have stated never reached the coordinator (a
        privacy review: a reply after the run ended left the report at 6.97 and the ledger at 8.00). A partner
        never trains past its target, so the target bounds that round."""
        eps = float(p["epsilon"])
        if p.get("no-reply"):
            eps = max(eps, float(p.get("target-epsilon") or self.cfg["target-epsilon"]))
        return eps

    def _local_bound(self, partners: list[dict[str, Any]]) -> str:
        """'(epsilon, delta)-DP ... at most (e, d) over N partners (worst: ...; targets ...)'."""
        worst = max(partners, key=self._spend_bound)
        # the largest delta, not the worst-epsilon partner's: partners account at their own (max-delta, an
        # earlier run's smaller promise), and "at most (e, d)" must hold for every one of them
        delta = max(float(p["delta"]) for p in partners)
        # each partner's own target: a node config max-epsilon may have lowered it below the run's
        targets = sorted({float(p.get("target-epsilon") or self.cfg["target-epsilon"]) for p in partners})
        bound = self._spend_bound(worst)
        why = (f", which did not answer round {', '.join(map(str, worst['no-reply']))}: it may have trained then, "
               "up to its target" if bound > float(worst["epsilon"]) else "")
        return (f"(epsilon, delta)-DP for any one of its users' whole interaction history (user-level DP-SGD, "
                f"{self.cfg['accountant']} accountant, whole ledger), at most ({stated_epsilon(bound)}, "
                f"{delta:.2g}) over {len(partners)} partner{'s' if len(partners) != 1 else ''} (worst: {worst['partner']}"
                f"{why}; targets {', '.join(f'{t:g}' for t in targets)})")

    def _silent_text(self) -> str:
        """Partners that answered no training message at all: their spend is on their ledgers only."""
        silent = sorted(p["partner"] for p in self.partners.values() if "epsilon" not in p and p.get("no-reply"))
        if not silent or not uses_local_dp(self.mode):
            return ""
        return (f" {len(silent)} partner{'s' if len(silent) != 1 else ''} ({', '.join(silent)}) answered no training "
                "message: any round they trained is on their ledgers, within their target-epsilon, not in this "
                "report.")

    def guarantee(self) -> str:
        """One sentence stating what the run guarantees, with its numbers."""
        parts = []
        trained = [p for p in self.partners.values() if "epsilon" in p]
        if uses_local_dp(self.mode):
            if trained:
                released = ["training"]
                if self.cfg.get("item-prior", "none") == "popularity":  # common/item_prior.py, on the same ledger
                    released.append("item histogram")
                if float(self.cfg.get("evaluation-noise-multiplier", 0.0)) > 0:
                    released.append("noised evaluation sums")
                what = released[0] if len(released) == 1 else ", ".join(released[:-1]) + " and " + released[-1]
                parts.append(f"each partner's {what} {'is' if len(released) == 1 else 'are'} "
                             + self._local_bound(trained))
            else:
                parts.append("no partner completed a DP-SGD round")
        elif floored := [p for p in trained if float(p["epsilon"]) > 0]:
            # dp-mode off/central, but partners whose node config max-epsilon forces DP-SGD (client/partner_policy.py)
            parts.append(f"{len(floored)} of {len(trained)} partners trained with local DP-SGD by their own node "
                         f"config (max-epsilon): their training is {self._local_bound(floored)}; the others' "
                         "updates carry no local DP")
        if uses_central_dp(self.mode):
            eps = self.central.get("epsilon")
            per_user = central_epsilon_per_user({**self.central, "rounds": self.central_rounds})
            if eps is not None:
                bound = f"({eps:.3f}, {self.central.get('delta'):.2g})-DP"
            elif not self.central_rounds:
                bound = "unchanged: no round released an aggregate"
            elif float(self.cfg["central-noise-multiplier"]) <= 0:
                bound = "clipped but not noised (central-noise-multiplier = 0), so not DP"
            else:
                bound = "noised but not accounted (Flower's accountant needs FedAvg)"
            parts.append(f"the sequence of global models is {bound} for any one partner's whole contribution "
                         f"(central DP, clipping {self.central.get('clipping', self.cfg['central-clipping'])}-side "
                         f"at {self.cfg['central-clipping-norm']:g}, "
                         f"noise multiplier {self.cfg['central-noise-multiplier']:g}, "
                         "trusting the coordinator to add the noise)"
                         + (f", and ({per_user[0]:.3f}, {per_user[1]:.2g})-DP for any one user of a partner (a user "
                            "can change its partner's whole clipped update: half the noise multiplier)"
                            if per_user else ""))
        if not parts:
            text = "No differential privacy: the released model carries no formal guarantee (dp-mode = off)."
        else:
            text = "; and ".join(parts)
            text = text[0].upper() + text[1:] + "."
        return text + self._silent_text() + self._resumed_text() + self._start_model_text()

    def _resumed_text(self) -> str:
        """A resumed run: a partner's update sent just before the stop reached no report, only its ledger."""
        # partners without local DP-SGD report epsilon 0: only a ledger's spend can be missed
        spent = any(float(p.get("epsilon") or 0) > 0 for p in self.partners.values())
        if not self.resumed_after or not (uses_local_dp(self.mode) or spent):
            return ""
        rounds = ", ".join(str(r + 1) for r in self.resumed_after)
        return (f" The run was resumed, so an update a partner sent in round {rounds} before the stop may have "
                "reached the coordinator without being counted here; its ledger has it, and counts here once "
                "the partner replies or refuses again.")

    def _start_model_text(self) -> str:
        """What the guarantee does not cover when the run started from a released model."""
        start = self.start_model
        if not start:
            return ""
        text = f" The run started from {start['path']}, trained with dp-mode {start.get('dp-mode')}"
        stated = str(start.get("guarantee") or "").strip().rstrip(".")
        if start.get("dp-mode") not in ("local", "central", "both"):
            return text + ": what that model learned from its training data is not covered by this guarantee."
        if not stated:  # a model handed on as a file: no privacy.json beside it states its run's guarantee
            return (text + ", but no privacy.json beside it states that run's guarantee: what that model learned "
                    "from its training data is not covered by this guarantee.")
        text += f"; its training data is covered by that run's own guarantee ({stated})"
        if uses_local_dp(self.mode) and start.get("dp-mode") in ("local", "both"):
            text += ", which the partners' ledgers add to this run's if they are the same ledgers"
        return text + "."
