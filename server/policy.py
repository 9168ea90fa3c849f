"""The operator's admission policy: rules a valid package must also meet to enter the zoo (the
ingest service applies them after the package checks). A refusal is (category, reason); the
category is logged in ``submissions.jsonl`` and counted in ``free-server status``.

- DP (``require-dp``, ``max-epsilon``): with ``require-dp`` a package without DP metadata is
  refused; with ``max-epsilon E`` (> 0) a package whose DP epsilon is above E is refused, and so is
  one without DP metadata (no guarantee is above any bound). The epsilon is the client's own report:
  the server cannot verify it.
- A model the operator deleted from quarantine is refused if it is sent again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from free_dfml.common.package import ModelPackage
    from free_dfml.server.settings import ServerSettings
    from free_dfml.server.zoo import Zoo

DP_POLICY = "dp-policy"
DELETED = "deleted"


def dp_refusal(dp: dict | None, require_dp: bool, max_epsilon: float) -> str | None:
    """Why a package with DP metadata ``dp`` (None: none) breaks the DP policy; None when it meets it."""
    bound = float(max_epsilon or 0)
    if not (require_dp or bound > 0):
        return None
    if not dp:
        return ("the server requires differentially private models (DP metadata with epsilon"
                + (f" <= {bound:g}" if bound > 0 else "") + "); this model has none")
    eps = dp.get("epsilon")
    if bound > 0 and (not isinstance(eps, (int, float)) or not float(eps) <= bound):
        return f"DP epsilon {eps} is above the server's maximum {bound:g}"
    return None


def admission_refusal(pkg: "ModelPackage", settings: "ServerSettings", zoo: "Zoo") -> tuple[str, str] | None:
    """(category, reason) when the server's policy refuses ``pkg``; None when it may enter the zoo."""
    reason = dp_refusal(pkg.meta.dp, settings.require_dp, settings.max_epsilon)
    if reason:
        return DP_POLICY, reason
    if zoo.quarantine.is_deleted(pkg.model_id):
        return DELETED, "this model was deleted by the server's operator"
    return None
