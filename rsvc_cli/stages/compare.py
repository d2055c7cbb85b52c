"""rsvc compare: every stage for one model pair and layer pair, reusing what the store has.

extract (both models, all layers the sweep needs, one pass each) -> decompose (both) ->
regress -> score -> importance -> collage -> (planted-concept checks) -> report. Ends with the
summary tables, the machine-readable results table (CSV, one row per class x concept x direction) next to the
scores artifact, and the report's path. The wall time of each stage is printed last and kept next to
that table (`<scores>.times.json`, the latest run's), so where a run spends its time stays visible.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from rsvc_cli import console
from rsvc_cli.stages import collage as collage_stage
from rsvc_cli.stages import importance as importance_stage
from rsvc_cli.stages import planted
from rsvc_cli.stages.provenance import RANDOM_WEIGHTS_BANNER, random_weights
from rsvc_cli.stages import report as report_stage
from rsvc_cli.stages.common import forward_precision_of, resolve_device
from rsvc_cli.stages.regress import prepare_pair, regress
from rsvc_cli.stages.score import score, write_results_table


def run(cfg) -> dict:
    times = console.StageTimes()
    pair = prepare_pair(cfg, times)
    with times.stage("regress"):
        regression = regress(pair, cfg)
    with times.stage("score"):
        result = score(pair, cfg, regression)
    if cfg.importance.enabled:
        with times.stage("importance"):
            result["importance"] = importance_stage.importance(pair, cfg, result)
    extra = importance_stage.table_columns(result.get("importance"))
    # The full table before the pictures: a failing collage (disk full) must not leave the table
    # that `score` wrote without its importance columns.
    result["table"] = write_results_table(result["path"].with_suffix(".csv"), result, extra_columns=extra)
    if cfg.collage.enabled:
        with times.stage("collage"):
            result["collages"] = collage_stage.collage(pair, cfg, result)
    else:
        result["collages"] = {}
        console.say("collages skipped (collage.enabled=false): the report has no image cards")
    # Comparison images with squares on exactly one class: the planted-concept experiment's checks.
    with times.stage("planted checks"):
        check = planted.planted_check(pair, cfg, result)
    if check is not None:
        result["planted"] = check
    else:
        del times.seconds["planted checks"]  # nothing was planted: no such stage in this run
    if cfg.report:
        with times.stage("report"):
            result["report"] = report_stage.report(pair, cfg, result)
        console.say(f"[bold]report:[/bold] {result['report']}")
    result["times"] = write_stage_times(result["path"].with_suffix(".times.json"), times, pair, cfg)
    times.show()
    console.say(f"stage times: {result['times']}" if result["times"] is not None
                else "stage times not stored: the store is read-only")
    if random_weights(cfg):  # said again at the end, where the summary is read
        console.say(f"[bold yellow]{RANDOM_WEIGHTS_BANNER.upper()}[/bold yellow]: {', '.join(random_weights(cfg))} "
                    "compared with random weights (random_weights_ok=true).")
    return result


def write_stage_times(path: Path, times: console.StageTimes, pair, cfg) -> Path | None:
    """The run's stage times with what they depend on most: forward-pass precision, device, threads."""
    import torch

    from rsvc_cli.models.precision import describe_precision

    device = resolve_device(cfg.device)
    record = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": {name: round(s, 3) for name, s in times.seconds.items()},
        "total_seconds": round(times.total, 3),
        "forward_precision": {m.label: describe_precision(forward_precision_of(m, cfg), device)
                              for m in (pair.model1, pair.model2)},
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        # A read-only store still serves every run whose artifacts it holds: the times are only shown.
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return None
        raise
    os.replace(tmp, path)
    return path
