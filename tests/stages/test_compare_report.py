"""`rsvc compare` ends with a report that shows every concept of every class with its three collages."""

from __future__ import annotations

import re

import pytest

from conftest import CHECKPOINTS, CIFAR_TEST, CIFAR_TRAIN, compose
from rsvc_cli.stages import compare


@pytest.mark.slow
def test_compare_cifar_cat_dog_report_has_every_concept(store, shared_dir, capsys):
    cfg = compose("compare", "experiment=cifar_r20_vs_r56", f"model1.checkpoint={CHECKPOINTS['cifar_resnet20']}",
                  f"model2.checkpoint={CHECKPOINTS['cifar_resnet56']}", "dataset.classes=[cat,dog]",
                  f"dataset.root={CIFAR_TRAIN}", f"dataset.evaluation_root={CIFAR_TEST}", "dataset.min_images_per_set=2",
                  "dataset.images_per_set={concept:4,regression:8,evaluation:8}", "decomposition.n_concepts=5",
                  "importance.steps=8", "importance.max_patches_per_class=8", f"store={store}")
    result = compare.run(cfg)
    err = capsys.readouterr().err
    index = result["report"]
    assert f"report: {index}" in err.replace("\n", "")
    out_dir = index.parent
    html = index.read_text()
    assert "cat" in html and "dog" in html
    pages = sorted((out_dir / "classes").glob("*.html"))
    assert len(pages) == 2
    for page in pages:
        text = page.read_text()
        # 5 concepts x 2 models, each with a top, an over and an under collage that exist on disk
        for kind in ("top", "over", "under"):
            images = re.findall(rf'src="\.\./(collages/[^"]+_{kind}\.png)"', text)
            assert len(set(images)) == 10, (page.name, kind, len(set(images)))
            assert all((out_dir / image).is_file() for image in images)
        # The per-class figure names both models; every card names its best match in the other model
        # (a concept of the other model, with its correlation) and, nothing planted, no square content.
        figure = re.findall(r'src="\.\./(plots/[^"]+_concepts\.svg)"', text)
        assert len(figure) == 1
        svg = (out_dir / figure[0]).read_text()
        assert "cifar_resnet20’s concepts" in svg and "cifar_resnet56’s concepts" in svg
        matches = re.findall(r'<div class="stat-best-match"><dt>best match</dt><dd>(.*?)</dd>', text)
        assert len(matches) == 10 and all(re.search(r"cifar_resnet(20|56) concept \d.*\(r -?\d\.\d{3}\)", m)
                                          for m in matches)
        assert "square content" not in text
    # importance reached the results table
    table = result["table"].read_text().splitlines()
    assert "importance" in table[0] and len(table) == 1 + 2 * 2 * 5
