import onnxruntime as ort  # test dependency (requirements-lock.txt): a missing package must fail
import pytest
import torch

from prunekit.models import build_model
from prunekit.structured import find_groups, slim


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_slim_model_exports_to_onnx_with_the_same_output(tmp_path, name):
    torch.manual_seed(0)
    kwargs = {"width": 0.25} if name == "mobilenet_v2" else {}
    model = build_model(name, (1, 28, 28), 10, **kwargs)
    x = torch.randn(2, 1, 28, 28)
    groups = find_groups(model, x)
    for g in [g for g in groups if g.prunable][::2]:
        g.zero_()
    small = slim(model, x, groups).eval()
    path = tmp_path / "slim.onnx"
    torch.onnx.export(small, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), small(x), rtol=1e-4, atol=1e-5)
