"""Pictures for people: collages from original images, PNG plots, and an offline HTML report.

- ``collage``: top / over / under patch selection, tiles cut from original images, grids, heatmaps.
- ``plots``: matplotlib (Agg) PNGs: per-class similarities, similarity vs importance, layer heatmaps.
- ``report``: ``write_report(out_dir, report)``, a self-contained report that works from file://.

Modules are imported on use (``from rsvc_cli.viz.report import write_report``) so that drawing a
collage does not pull in matplotlib.
"""
