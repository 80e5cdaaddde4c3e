"""Monitoring: jobs that read the prediction log, the feedback and the stream's feature rows.

`sluice monitor` (cli/monitor.py) runs ``runner.run_monitor``: a restartable consumer that,
per model version and tumbling period (settings.monitor_period_s), measures

- drift of every model input and of the predictions against the training reference saved
  with the version (drift.py; statistics and bands in stats.py),
- freshness of the served windows against the availability contract, per view, and how late
  the stream emits rows (freshness.py),
- live error (MAE) from feedback joined to predictions, against the training MAE
  (live_error.py),
- row-level online/offline skew of a reproducible sample, recomputed with Spark (skew.py),
- latency, batch size, throughput and traffic share per version (traffic.py),

and writes typed results and alerts (records.py) to settings.monitoring_topic, Prometheus
metrics (metrics.py) and, with ``--serve``, a dashboard (dashboard.py, page.py).

Layering: this package imports core, features, feature_repo, models and events, and batch
lazily (Spark, for skew only); only cli/ and examples/ import it. Settings: monitoring_topic,
monitor_period_s, monitor_grace_s, monitor_group, monitor_min_rows, monitor_skew_sample,
monitor_host, monitor_port (core/settings.py).
"""
