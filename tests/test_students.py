"""Students: timm backbones behind the encoder protocol, registry entries, task models, checkpoints."""
from __future__ import annotations

import pytest
import torch

from mirage_edge.errors import ConfigError, InputError, ModelNotFoundError
from mirage_edge.models import create_model, list_models
from mirage_edge.models.students import ALIASES, STUDENTS, build_student

torch.set_num_threads(2)
SUPPORTED = ["mobilenetv4_conv_small", "vit_tiny_c32", "repvit_m0_9", "resnet18", "student-tiny"]
REGISTERED = [*SUPPORTED, "vit_tiny_patch32", "mobileone_s0"]  # the last two: not supported (distill/README.md)


def test_registered_under_timm_names_and_aliases():
    names = set(list_models())
    for n in REGISTERED:
        assert n in names
    for alias in ALIASES:
        assert alias in names
    with pytest.raises(ModelNotFoundError, match="mobilenetv4_conv_small"):
        create_model("mobilenetv4_conv_smal")


@pytest.mark.parametrize("name", REGISTERED)
def test_encoder_protocol_stride32(name):
    m = create_model(name, img_size=64).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tokens = m.forward_features(x)
        fmap = m.forward_feature_map(x)
        stages = m.forward_intermediates({"bscan": x}, [0, -1])
    assert m.token_grid(64, 64) == (2, 2)
    assert m.num_global_tokens == 0
    assert tokens.shape == (2, 4, m.embed_dim)
    assert fmap.shape == (2, m.embed_dim, 2, 2)
    # tokens are the feature map in row-major order
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2))
    for out, idx in zip(stages, [0, -1]):
        chs, stride = m.stage_info[idx]
        assert out.shape == (2, chs, 64 // stride, 64 // stride)


def test_vit_student_is_patch32_without_class_token():
    m = build_student("vit_tiny_patch32", img_size=128)
    assert m.body.patch_embed.patch_size == (32, 32)
    assert getattr(m.body, "num_prefix_tokens", 0) == 0
    assert m.forward_features(torch.rand(1, 1, 128, 128)).shape == (1, 16, 192)


def test_conv_stem_vit_student_round_trips_through_checkpoint_and_onnx(tmp_path):
    """vit_tiny_c32: the ViT-Ti/32 whose tokens come from five 3x3 stride-2 convs + a 1x1 projection."""
    import onnxruntime as ort

    from mirage_edge.models import save_model
    from mirage_edge.models.students import student_from_config

    m = build_student("vit-tiny-32c", img_size=128).eval()
    convs = [mod for mod in m.body.patch_embed.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 5 + [(1, 1)] and convs[-1].out_channels == 192
    assert getattr(m.body, "num_prefix_tokens", 0) == 0 and m.patch_size == (32, 32)
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        tokens = m.forward_features(x)
    assert tokens.shape == (2, 16, 192)
    assert m.cfg.timm_kwargs["conv_stem"] == [16, 32, 64, 128, 256]
    rebuilt = student_from_config(m.cfg.to_dict()).eval()
    rebuilt.load_state_dict(m.state_dict())
    save_model(m, tmp_path / "s")
    back = create_model("mirage", checkpoint=tmp_path / "s").eval()
    onnx_path = tmp_path / "s.onnx"
    torch.onnx.export(m, (x,), str(onnx_path), input_names=["x"], dynamo=False)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(x), tokens)
        torch.testing.assert_close(back.forward_features(x), tokens)
    torch.testing.assert_close(torch.from_numpy(got), tokens, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="conv_stem needs 5 positive channel counts"):
        build_student("vit_tiny_c32", img_size=128, conv_stem=[16, 32, 64])


def test_no_pretrained_download_and_bad_input():
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("student-tiny", pretrained=True)
    # export --input-size and bench registry rows pass the teachers' input_size keyword
    assert create_model("vit_tiny_c32", input_size=(64, 64)).input_size == (64, 64)
    assert create_model("student-tiny", input_size=96).input_size == (96, 96)
    # [H, W] inputs (a B-scan's aspect): the ViT's positional table is built for that grid
    vit = create_model("vit_tiny_c32", input_size=(64, 128), depth=1)
    assert vit.input_size == (64, 128)
    assert tuple(vit.forward_features(torch.rand(1, 1, 64, 128)).shape[1:]) == (2 * 4, vit.embed_dim)
    with pytest.raises(ConfigError, match="unknown student"):
        build_student("resnet50")
    m = build_student("student-tiny", img_size=64)
    with pytest.raises(InputError, match="B x 1 x H x W"):
        m.forward_features(torch.rand(1, 3, 64, 64))
    with pytest.raises(InputError, match="B-scan only"):
        m.forward_features({"slo": torch.rand(1, 1, 64, 64)})


@pytest.mark.parametrize("name", ["mobileone_s0", "repvit_m0_9"])
def test_reparameterize_keeps_outputs(name):
    m = build_student(name, img_size=64).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ref = m.forward_features(x)
        m.reparameterize()
        got = m.forward_features(x)
    assert m.cfg.reparameterized and m.mirage_edge_spec["kwargs"]["reparameterized"]
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_students_slot_into_task_models_and_round_trip(tmp_path):
    from mirage_edge.models import save_model
    from mirage_edge.models.task import classification_model, segmentation_model

    enc = create_model("student-tiny", img_size=64)
    seg = segmentation_model(enc, 5, class_dim=16, depth=1).eval()
    x = torch.rand(2, 1, 64, 64)
    assert seg(x).shape == (2, 5, 64, 64)
    cls = classification_model(create_model("student-tiny", img_size=64), 3).eval()
    assert cls(x).shape == (2, 3)
    save_model(seg, tmp_path / "seg")
    back = create_model("mirage", checkpoint=tmp_path / "seg").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), seg(x))


def test_projected_student_round_trip(tmp_path):
    from mirage_edge.models.projector import ProjectedStudent
    from mirage_edge.models import save_model

    proj = ProjectedStudent(build_student("student-tiny", img_size=64), teacher_dim=48, teacher_grid=(8, 8),
                            num_global_tokens=1, layer_map={1: 2}).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tokens, inter = proj.forward_distill(x)
    assert tokens.shape == (2, 65, 48) and inter[1].shape == (2, 64, 48)
    assert proj.token_grid(64, 64) == (8, 8)
    save_model(proj, tmp_path / "p")
    back = create_model("mirage", checkpoint=tmp_path / "p").eval()
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), tokens)


def test_input_scale_gives_a_finer_grid_and_round_trips(tmp_path):
    """input_scale=2: a 128 px ViT-Ti/32 sees the image at 256 px inside the model -> 8 x 8 tokens,
    the grid of a teacher with 16 px patches; checkpoint and ONNX still take 128 px."""
    import onnxruntime as ort

    from mirage_edge.models.projector import ProjectedStudent
    from mirage_edge.models import save_model

    vit = build_student("vit_tiny_patch32", img_size=128, input_scale=2).eval()
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        assert vit.forward_features(x).shape == (2, 64, 192)
        ref = build_student("vit_tiny_patch32", img_size=256).eval()
        ref.load_state_dict(vit.state_dict())
        up = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
        torch.testing.assert_close(vit.forward_features(x), ref.forward_features(up))
    assert vit.token_grid(128, 128) == (8, 8) and vit.patch_size == (16, 16)
    cnn = build_student("student-tiny", img_size=64, input_scale=2).eval()
    assert cnn.forward_intermediates(torch.rand(1, 1, 64, 64), [-1])[0].shape[-2:] == (4, 4)

    proj = ProjectedStudent(vit, teacher_dim=48, teacher_grid=(8, 8), num_global_tokens=1).eval()
    with torch.no_grad():
        tokens = proj.forward_features(x)
    assert tokens.shape == (2, 65, 48)
    save_model(proj, tmp_path / "p")
    back = create_model("mirage", checkpoint=tmp_path / "p").eval()
    assert back.student.input_scale == 2
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x), tokens)
    onnx_path = tmp_path / "p.onnx"
    torch.onnx.export(proj, (x,), str(onnx_path), input_names=["x"], dynamo=False)
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x.numpy()})[0]
    assert float(abs(got - tokens.numpy()).max()) < 1e-3
    with pytest.raises(ConfigError, match="input_scale"):
        build_student("student-tiny", img_size=64, input_scale=3)


def test_projector_subpixel_upsampling_is_local_to_each_student_cell():
    """A teacher grid 4x finer than the student map (8 x 8 vs 2 x 2): each student cell predicts its
    own 4 x 4 tokens (PixelShuffle); bilinear interpolation spreads a cell over the whole grid."""
    from mirage_edge.models.projector import ProjectedStudent

    torch.manual_seed(0)
    shuf = ProjectedStudent(build_student("student-tiny", img_size=64), 16, (8, 8), 0).eval()
    bil = ProjectedStudent(build_student("student-tiny", img_size=64), 16, (8, 8), 0, upsample="bilinear").eval()
    assert (shuf.proj.r, bil.proj.r) == (4, 1)
    fmap = torch.randn(1, shuf.student.embed_dim, 2, 2)
    bumped = fmap.clone()
    bumped[..., 0, 1] += 1.0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[0:4, 4:8] = True
    with torch.no_grad():
        changed = ((shuf.proj(fmap) - shuf.proj(bumped)).abs().sum(-1).reshape(8, 8) > 0)
        spread = ((bil.proj(fmap) - bil.proj(bumped)).abs().sum(-1).reshape(8, 8) > 0)
    assert torch.equal(changed, expected)
    assert int(spread.sum()) > 16
    # no exact multiple (2 x 2 -> 5 x 5): resampled first, as before
    assert ProjectedStudent(build_student("student-tiny", img_size=64), 16, (5, 5), 0).proj.r == 1
    with pytest.raises(ValueError, match="upsample"):
        ProjectedStudent(build_student("student-tiny", img_size=64), 16, (8, 8), 0, upsample="nearest")


def test_projected_student_checkpoint_without_upsample_key_is_bilinear():
    """Checkpoints written before `upsample` existed rebuild with the projector they were trained with."""
    from mirage_edge.models.students import projected_student

    old = projected_student(student="student-tiny", img_size=64, teacher_dim=16, teacher_grid=(8, 8))
    assert old.upsample == "bilinear" and old.proj.r == 1


def test_resnet18_student_qat_exports_to_qdq_onnx(tmp_path):
    """The fourth family: a drop-in segmentation student quantizes with NNCF and its Q/DQ ONNX graph
    runs in ONNX Runtime like the fake-quant torch model (tiny input, random weights)."""
    pytest.importorskip("nncf")
    pytest.importorskip("onnxruntime")
    from mirage_edge.models.projector import ProjectedStudent
    from mirage_edge.distill.qat import export_qdq_onnx, ort_predict, ort_session, prepare_qat
    from mirage_edge.distill.recipe import QATSpec
    from mirage_edge.models.task import segmentation_model

    torch.manual_seed(0)
    proj = ProjectedStudent(build_student("resnet-18", img_size=64), teacher_dim=32, teacher_grid=(4, 4),
                            num_global_tokens=1, layer_map={})
    seg = segmentation_model(proj, 3, preds_per_patch=16, class_dim=8, depth=1).eval()
    assert proj.student.stage_info[-1] == (512, 32)
    calib = [torch.rand(2, 1, 64, 64) for _ in range(2)]
    q, info = prepare_qat(seg, calib, QATSpec(enabled=True, subset_size=4))
    assert info["num_quantizers"] > 20
    counts = export_qdq_onnx(q, tmp_path / "r18.onnx", torch.zeros(1, 1, 64, 64))
    assert counts["QuantizeLinear"] > 20
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref = q(x)
    got = next(ort_predict(ort_session(tmp_path / "r18.onnx", 1), [x]))
    assert got.shape == ref.shape == (2, 3, 64, 64)
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) > 0.97


def test_student_table_has_cpu_evidence():
    for name, (_, _, desc) in STUDENTS.items():
        assert desc, name
