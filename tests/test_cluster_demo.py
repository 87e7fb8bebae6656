"""The cluster smoke: `nbiot-gateway cluster-demo`'s run, short. Three gateway hosts
(cluster.ack = broker) behind the nf_tables balancer on a 3-node RabbitMQ cluster, in
namespaces; a host killed with its state deleted and a broker node killed under load;
every acknowledged uplink read back. Root only (network namespaces)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.tools.lab.cluster_demo import HOSTS, ClusterDemo
from gateway.tools.lab.netns import leftovers

if os.geteuid() != 0:
    pytest.fail("tests/test_cluster_demo.py needs root (network namespaces), as "
                "./scripts/test runs", pytrace=False)

# Namespaces, nf_tables and RabbitMQ nodes on fixed subnets: one test at a time.
pytestmark = pytest.mark.xdist_group("netns")


def test_a_host_lost_for_good_and_a_broker_node_lose_nothing_acknowledged(
        tmp_path: Path) -> None:
    demo = ClusterDemo(ack="broker", devices=300, interval_s=5.0, duration_s=12.0, seed=3,
                       prefix="nbtcd", workdir=tmp_path, net=71)
    report = demo.run()
    assert report.acked > 100, report
    assert report.lost == 0, report
    assert report.queue_distinct >= report.delivered, report
    assert all(report.share[h] > 0 for h in HOSTS), report.share
    assert report.broker_failovers["h1"] >= 1  # its broker node was the one killed
    assert report.faults[0].noticed_s is not None
    assert leftovers("nbtcd") == []
