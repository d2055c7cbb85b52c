"""Four `rsvc compare` processes at once on one store, asking for overlapping artifacts.

Two ask for the same comparison, one shares model 1's layer with them, one shares model 2's. Every
process succeeds; every artifact is written by exactly one of them (counted from the 'wrote <kind>
<path>' lines of all four), the others wait and reuse it; nothing in the store is corrupt, nothing
is left locked or partial, and the shared comparison equals an uninterrupted single run.
"""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from reliability_helpers import (
    ARTIFACT_LINE,
    FAST,
    Watched,
    artifacts,
    assert_all_artifacts_usable,
    assert_same_artifacts,
    leftovers,
    reference_run,
)

JOBS = (
    (),  # the reference comparison: cifar_resnet20 layer2 vs tiniest l3
    (),  # the same again
    ("layer2=l2",),  # shares model 1's activations and concepts
    ("layer1=layer3",),  # shares model 2's activations and concepts
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return reference_run(tmp_path_factory.mktemp("concurrent"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_four_overlapping_compares_write_each_artifact_once(reference, tmp_path):
    store = tmp_path / "store"
    jobs = [Watched.start_rsvc("compare", *FAST, *extra, f"store={store}", cwd=tmp_path) for extra in JOBS]
    codes = [job.finish() for job in jobs]
    logs = [job.stderr() for job in jobs]
    for extra, code, log in zip(JOBS, codes, logs):
        assert code == 0, f"job {extra} failed:\n{log}"

    writes = Counter()
    for log in logs:
        for line in log.splitlines():
            match = ARTIFACT_LINE.match(line)
            if match and match.group(1) == "wrote":
                writes[match.group(3)] += 1
    twice = {path: n for path, n in writes.items() if n > 1}
    assert not twice, f"artifacts computed more than once: {twice}"
    stored = {str(path) for path in artifacts(store).values()}
    assert stored == set(writes), "every artifact in the store was written by exactly one job"
    # 2 + 2 activations (model 1: layer2, layer3; model 2: l3, l2), as many concepts, 3 comparisons.
    assert len(stored) == 4 + 4 + 3 * (1 + 1 + 2)

    assert_all_artifacts_usable(store)
    assert_same_artifacts(store, reference.store, superset=True)
    assert leftovers(store) == []
    # The two identical jobs drew the same collages into the same folder: every picture is whole.
    pictures = sorted(store.glob("reports/*/collages/*/*.png"))
    assert pictures
    for picture in pictures:
        with Image.open(picture) as image:
            image.load()
