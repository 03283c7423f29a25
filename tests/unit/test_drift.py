"""The drift test itself: KS per feature against a reference sample, masked columns left out."""

import numpy as np

from shared.drift import REFERENCE_ROWS, compare, load_reference, logged_rows, reference_bytes


def test_the_same_distribution_does_not_drift_and_a_shifted_feature_does():
    rng = np.random.default_rng(0)
    reference = load_reference(reference_bytes(rng.normal(size=(2000, 2, 2))))
    assert reference.shape == (REFERENCE_ROWS, 4)  # sampled, each example flattened to one row
    same = compare(reference, rng.normal(size=(200, 4)), 0.01)
    assert same.drifted == [] and same.rows == 200 and same.score < 0.2
    shifted = rng.normal(size=(200, 4))
    shifted[:, 2] += 1.5
    report = compare(reference, shifted, 0.01)
    assert report.drifted == [2] and report.score > 0.4


def test_masked_columns_logged_as_null_are_left_out():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 3))
    events = [
        {"maasversion": "2", "data": {"request": {"inputs": {"x": {"data": [[float(a), None, float(b)]]}}}}}
        for a, b in rng.normal(size=(100, 2)) + [0, 3]  # the third feature shifted
    ] + [{"maasversion": "1", "data": {"request": {"inputs": {"x": {"data": [[0.0, 0.0, 0.0]]}}}}}]
    rows = logged_rows(events, version=2, width=3)
    assert rows.shape == (100, 3) and np.isnan(rows[:, 1]).all()
    assert compare(reference, rows, 0.01).drifted == [2]
