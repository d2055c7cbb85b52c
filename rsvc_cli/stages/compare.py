"""rsvc compare: every stage for one model pair and layer pair, reusing what the store has.

extract (both models, all layers the sweep needs, one pass each) -> decompose (both) ->
regress -> score -> importance -> collage -> (planted-concept checks) -> report. Ends with the
summary tables, the machine-readable results table (CSV, one row per class x concept x direction) next to the
scores artifact, and the report's path.
"""

from __future__ import annotations

from rsvc_cli import console
from rsvc_cli.stages import collage as collage_stage
from rsvc_cli.stages import importance as importance_stage
from rsvc_cli.stages import planted
from rsvc_cli.stages.provenance import RANDOM_WEIGHTS_BANNER, random_weights
from rsvc_cli.stages import report as report_stage
from rsvc_cli.stages.regress import prepare_pair, regress
from rsvc_cli.stages.score import score, write_results_table


def run(cfg) -> dict:
    pair = prepare_pair(cfg)
    result = score(pair, cfg, regress(pair, cfg))
    if cfg.importance.enabled:
        result["importance"] = importance_stage.importance(pair, cfg, result)
    extra = importance_stage.table_columns(result.get("importance"))
    # The full table before the pictures: a failing collage (disk full) must not leave the table
    # that `score` wrote without its importance columns.
    result["table"] = write_results_table(result["path"].with_suffix(".csv"), result, extra_columns=extra)
    result["collages"] = collage_stage.collage(pair, cfg, result) if cfg.collage.enabled else {}
    if not cfg.collage.enabled:
        console.say("collages skipped (collage.enabled=false): the report has no image cards")
    # Comparison images with squares on exactly one class: the planted-concept experiment's checks.
    check = planted.planted_check(pair, cfg, result)
    if check is not None:
        result["planted"] = check
    if cfg.report:
        result["report"] = report_stage.report(pair, cfg, result)
        console.say(f"[bold]report:[/bold] {result['report']}")
    if random_weights(cfg):  # said again at the end, where the summary is read
        console.say(f"[bold yellow]{RANDOM_WEIGHTS_BANNER.upper()}[/bold yellow]: {', '.join(random_weights(cfg))} "
                    "compared with random weights (random_weights_ok=true).")
    return result
