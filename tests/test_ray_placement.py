"""Whether Ray replicas fit, and what the refusal says: the arithmetic, without a cluster.

The same checks on a real local head are in tests/test_ray.py.
"""

from __future__ import annotations

from llm_nb.backends.ray_placement import Holder, Placement, replica_ask, replicas_that_fit


def test_a_replica_asks_for_one_cpu_unless_its_actor_options_say_otherwise():
    assert replica_ask(None) == {"CPU": 1.0}
    assert replica_ask({"num_cpus": 0.5, "num_gpus": 1}) == {"CPU": 0.5, "GPU": 1.0}
    assert replica_ask({"num_cpus": 0, "memory": 2**30, "resources": {"TPU": 4}}) == {"memory": 2.0**30, "TPU": 4.0}


def test_replicas_fit_node_by_node_not_by_the_clusters_sum():
    two_small_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert replicas_that_fit({"CPU": 1.0}, two_small_nodes) == 2
    assert replicas_that_fit({"CPU": 2.0}, two_small_nodes) == 0, "2 CPUs in all, but never on one node"
    assert replicas_that_fit({"CPU": 0.3}, [{"CPU": 0.9}]) == 3, "fractions that add up exactly"
    assert replicas_that_fit({"CPU": 1.0, "GPU": 1.0}, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}]) == 1
    assert replicas_that_fit({}, []) > 1000, "a replica that asks for nothing always fits"


def placement(**kw) -> Placement:
    facts = dict(
        ask={"CPU": 1.0},
        replicas=2,
        total={"CPU": 2.0, "memory": 8.0 * 2**30},
        free={"CPU": 0.0},
        fit_empty=2,
        fit_now=0,
        autoscaling=False,
        holders=[Holder("'a'", 1, {"CPU": 1.0})],
        running=1,
        pending=1,
    )
    return Placement(**{**facts, **kw})


def test_the_busy_refusal_names_what_each_needs_what_is_free_and_who_holds_the_rest():
    text = placement().busy_text()
    assert text.startswith("1 of 2 replicas cannot be placed beside what runs now")
    assert "each replica needs 1 CPU; the cluster has 0 of 2 CPUs free" in text
    assert "held by 'a' (1 replica × 1 CPU)" in text and "--wait-for-resources" in text
    nobody = placement(holders=[]).busy_text()
    assert "nothing else on the cluster holds them" in nobody


def test_what_can_never_fit_says_so_and_how_much_the_cluster_holds():
    never = placement(replicas=3, fit_empty=2, running=0, pending=0)
    assert never.never_fits and not placement().never_fits
    text = never.never_fits_text()
    assert text.startswith("3 replicas can never fit on this Ray cluster")
    assert "and even empty it holds only 2 such replicas" in text and "num_cpus may be a fraction" in text
    assert "even at its autoscaler's largest size it holds" in placement(replicas=9, autoscaling=True).never_fits_text()
    assert (
        placement(ask={"memory": 2.0**30}, free={"memory": 0.5 * 2**30})
        .needs_text()
        .endswith("the cluster has 512.0 MiB of 8.0 GiB memory free")
    )
