"""The PTQ fan-out on a Dask cluster (prefect-dask's DaskTaskRunner), under a real Prefect API."""

from distributed import LocalCluster

from quantlab import registry
from quantlab.store import Store


def test_ptq_variants_fan_out_over_a_dask_cluster(prefect, tiny_config, tmp_path):
    from quantlab_flows.quantize import quantize

    cfg = tiny_config.model_copy(update={
        "qat": tiny_config.qat.model_copy(update={"enabled": False}),
        "sensitivity": tiny_config.sensitivity.model_copy(update={"enabled": False})})
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                      local_directory=str(tmp_path / "dask")) as cluster:
        result = quantize(cfg.model_copy(update={"dask_address": cluster.scheduler_address}))
        ran_on_dask = cluster.scheduler.task_prefixes["ptq_variant"].state_counts["memory"]
    assert ran_on_dask == len(cfg.variants) == 2
    m = registry.load_manifest(Store(cfg.store), result.manifest.run_id)
    assert [a.variant for a in m.artifacts] == ["float", "ptq-minmax", "ptq-x86"]
