"""Which clients train in a round: a function of the run's seed, the round and the connected devices' identities.

Flower gives nodes new random ids at every start, so sampling node ids gives every run, every algorithm and every
resumed run other clients. Instead each node names a stable identity (its node config's `name`, or
`partition-K`), which the server asks for once per node (a `query.identity` message), and the round's clients are
drawn from the sorted identities with an RNG seeded by (seed, round) alone: the same seed gives the same clients
in every round to every algorithm, every rerun and a resumed run.
"""

from __future__ import annotations

import random
import time
from logging import INFO, WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedpt_app.protocol import IDENTITY_KEY, IDENTITY_QUERY


class IdentityError(RuntimeError):
    """Two connected nodes claim the same identity: their schedule would be ambiguous."""


def round_sample(identities: list[str], size: int, seed: int, server_round: int) -> list[str]:
    """`size` of the identities (all when fewer), sorted, drawn by an RNG seeded by (seed, round) alone."""
    rng = random.Random(seed * 1_000_003 + server_round)
    return sorted(rng.sample(sorted(identities), min(size, len(identities))))


def sample_size(connected: int, fraction: float, min_nodes: int) -> int:
    """How many clients a round samples: `fraction` of the connected nodes, at least `min_nodes`."""
    return max(int(connected * fraction), min_nodes)


class ClientSchedule:
    def __init__(self, seed: int, fraction: float, min_nodes: int, timeout: float) -> None:
        self.seed, self.fraction, self.min_nodes, self.timeout = seed, fraction, min_nodes, timeout
        self.identities: dict[int, str] = {}  # node id -> identity, learned once per node

    def sample(self, grid: Grid, server_round: int) -> tuple[list[int], list[str], int]:
        """(node ids, identities) of the round's clients, and how many nodes were connected: `fraction` of the
        connected nodes, at least `min_nodes`, waiting for that many to connect (as Flower's FedAvg samples)."""
        connected = self._connected(grid)
        self._learn(grid, connected)
        by_identity = {self.identities[node]: node for node in connected if node in self.identities}
        size = sample_size(len(connected), self.fraction, self.min_nodes)
        chosen = round_sample(list(by_identity), size, self.seed, server_round)
        log(INFO, "configure_train: sampled %d of %d nodes: %s", len(chosen), len(connected), ", ".join(chosen))
        return [by_identity[identity] for identity in chosen], chosen, len(connected)

    def _connected(self, grid: Grid) -> list[int]:
        while len(nodes := sorted(grid.get_node_ids())) < self.min_nodes:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d)", len(nodes), self.min_nodes)
            time.sleep(1)
        return nodes

    def _learn(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask the nodes not seen before for their identity; a node that cannot answer is skipped this round."""
        unknown = [node for node in node_ids if node not in self.identities]
        if not unknown:
            return
        queries = [Message(RecordDict(), dst_node_id=node, message_type=IDENTITY_QUERY) for node in unknown]
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or IDENTITY_KEY not in reply.content.config_records:
                reason = reply.error.reason if reply.has_error() else "no identity in the reply"
                log(WARNING, "[fedpt-app] node %d did not say who it is (%s): not sampled this round", node, reason)
                continue
            self.identities[node] = str(reply.content[IDENTITY_KEY]["name"])
        names = [name for node, name in self.identities.items() if node in node_ids]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise IdentityError(
                f"Several connected nodes claim the identities {duplicates}: give each device its "
                "own `name` (or partition-id) in its node config"
            )
