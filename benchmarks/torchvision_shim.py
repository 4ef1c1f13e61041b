"""Import torchvision's model definitions with the CPU build of torch.

The PyPI wheel of torchvision carries a C extension built against the CUDA build of torch; with the
CPU build it cannot load, and `import torchvision` then fails at `torchvision::nms` while registering
fake kernels for its detection ops. The classification model definitions are pure Python and need
none of those ops. Import this module before torchvision: it lets those registrations fail quietly,
and nothing else changes (detection ops such as nms stay unavailable).

    import torchvision_shim  # noqa: F401  (a benchmark script: benchmarks/ is on sys.path)
    from torchvision import models
    models.get_model("efficientnet_b0", weights=None)

It lives in ``benchmarks/`` because a benchmark script can import nothing above its own folder
without editing ``sys.path``; the tests, run from the repository root, import it as
``benchmarks.torchvision_shim``.
"""

import torch

_register_fake = torch.library.register_fake


def _tolerant_register_fake(op, *args, **kwargs):
    def decorate(fn):
        try:
            return _register_fake(op, *args, **kwargs)(fn)
        except RuntimeError:  # the operator was never defined: the C extension did not load
            return fn

    return decorate


torch.library.register_fake = _tolerant_register_fake
try:
    import torchvision  # noqa: F401
finally:
    torch.library.register_fake = _register_fake
