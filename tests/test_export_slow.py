"""mirage-base export at its real size (512 x 512): heavy, only under -m slow."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_when_selected(request):
    # ~6 min on 2 busy cores: run it explicitly with `pytest -m slow tests/test_export_slow.py`.
    if "slow" not in (request.config.getoption("-m") or "") or "not slow" in request.config.getoption("-m"):
        pytest.skip("mirage-base export at 512 x 512 takes minutes; select it with -m slow")


def test_mirage_base_openvino_fp32_int8(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("openvino")
    from mirage_edge.artifact import load_verified_meta
    from mirage_edge.export import export_model, load_target
    from mirage_edge.models import create_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = create_model("mirage-base").eval()
    t = load_target("cpu-openvino-int8", ['precisions=["fp32", "int8"]', "quantization.calib_images=16",
                                          "validation.n_inputs=4", "batch.max=2"])
    dirs = export_model(model, tmp_path, t)
    for d in dirs:
        meta = load_verified_meta(d)
        assert meta.inputs[0].shape[2:] == [512, 512]
        assert meta.parity["cosine"] >= (0.9999 if meta.precision == "fp32" else 0.98)
    assert load_verified_meta(dirs[1]).quantization.model_type == "transformer"
