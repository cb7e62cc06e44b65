"""The node provider of a node-autoscaled simulated cluster (`ditserve serve --simulate ...
--node-autoscaling`): Ray's own fake multi-node provider, whose nodes are raylets on this
machine, with a GPU node's provisioning time in front of each launch.

Ray's autoscaler (started by the head node from the cluster config that
serving/simulate/cluster.py writes) loads this class by its module path (provider type
`external`) and calls it from a launcher thread, so the wait holds only that launch: the
autoscaler meanwhile counts the node as pending, as it does a cloud machine that is booting.
"""

from __future__ import annotations

import logging
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

logger = logging.getLogger(__name__)

STARTUP_KEY = "node_startup_s"  # provider config: seconds (compressed) a launch waits before the node starts


class ProvisionedNodeProvider(FakeMultiNodeProvider):
    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        delay = float(self.provider_config.get(STARTUP_KEY, 0.0))
        logger.info("provisioning %d simulated GPU node(s): %.1f s", count, delay)
        time.sleep(delay)  # every node of one launch boots at once, as a cloud's do
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
