"""How the meta-train classes are split among clients: one seeded plan that the simulated clients
(``client/virtual_client.py``, through Flower or in process) and the benchmark harness all use, so a client
id always means the same classes.
"""

from __future__ import annotations

import torch


def client_classes(num_classes: int, clients: int, per_client: int, disjoint: bool, seed: int
                   ) -> list[list[int]]:
    """Each client's meta-train class indices: disjoint while the split allows, else wrapping around."""
    g = torch.Generator().manual_seed(seed)
    if per_client > num_classes:
        raise ValueError(f"{per_client} classes per client but the split has {num_classes}")
    if disjoint:
        perm = torch.randperm(num_classes, generator=g).tolist()
        out = []
        for i in range(clients):
            start = (i * per_client) % num_classes
            cls = [perm[(start + j) % num_classes] for j in range(per_client)]
            out.append(cls)
        return out
    return [torch.randperm(num_classes, generator=g)[:per_client].tolist() for _ in range(clients)]
