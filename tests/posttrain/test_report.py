"""The compression report of :mod:`prunekit.posttrain.report`."""

import json

import prunekit
from tests.helpers import MLP, calibration_batches


def test_report_round_trips_through_json():
    model, batches = MLP(), calibration_batches()
    report = prunekit.compress(model, batches, "gptq", bits=4)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["method"] == "gptq" and len(data["layers"]) == 3
    assert data["config"]["bits"] == 4
