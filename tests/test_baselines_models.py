"""ODConv / KernelWarehouse modules and the baseline classifiers (timm side). CPU, tiny inputs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from overlock.models.baselines import (
    BASELINE_ARCHS,
    KW_SCHEDULE,
    ODCONV_SCHEDULE,
    anneal_temperature,
    checkpoint_filter_fn,
    set_temperature,
)
from overlock.models.kernelwarehouse import KWConv2d, WarehouseManager
from overlock.models.odconv import ODConv2d
from overlock.registry import import_model_modules, resolve_model

torch.set_num_threads(1)

# Classifier parameter counts published by the official READMEs / papers (millions, 1000 classes).
PUBLISHED_CLASSIFIER_PARAMS_M = {
    "resnet50": 25.56,
    "odconv1x_resnet50": 28.64,
    "odconv4x_resnet50": 90.67,
    "kw1x_resnet50": 28.05,
    "kw4x_resnet50": 102.02,
    "mobilenetv2_100": 3.50,
    "odconv1x_mobilenetv2_100": 4.94,
    "odconv4x_mobilenetv2_100": 11.52,
    "kw1x_mobilenetv2_100": 5.17,
    "kw4x_mobilenetv2_100": 11.38,
    "convnext_tiny": 28.59,
    "kw1x_convnext_tiny": 39.37,
}
DYNAMIC_ARCHS = [a for a, s in BASELINE_ARCHS.items() if s["conv_type"] != "plain"]
# channels of the 4 dense levels (strides 4-32) of the official networks, per family
PYRAMIDS = {"resnet": (256, 512, 1024, 2048), "mobilenetv2": (24, 32, 96, 1280),
            "convnext": (96, 192, 384, 768)}


def tiny_overrides(arch: str) -> dict:
    """One block per stage: every code path (incl. KW warehouse hand-over) at a fraction of the cost."""
    return {"depth": [1] * 7} if "mobilenetv2" in arch else {"depth": [1, 1, 1, 1]}


def dynamic_convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (ODConv2d, KWConv2d))]


def per_sample_reference(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Naive reference: an ordinary convolution of each sample with its own aggregated kernel."""
    weights = conv.aggregated_weight(x)
    outs = [
        F.conv2d(x[i : i + 1], weights[i], None, conv.stride, conv.padding, conv.dilation, conv.groups)
        for i in range(x.shape[0])
    ]
    out = torch.cat(outs)
    bias = getattr(conv, "bias", None)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def test_classifier_param_counts_match_published():
    for arch, published in PUBLISHED_CLASSIFIER_PARAMS_M.items():
        with torch.device("meta"):
            model = timm.create_model(f"dc_{arch}")
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(count - published) / published < 0.005, f"{arch}: {count:.3f}M vs published {published}M"


@pytest.mark.parametrize(
    "groups,kernel_size,kernel_num", [(1, 3, 4), (1, 1, 1), (1, 1, 4), (8, 3, 1), (2, 3, 4)]
)
def test_odconv_forward_equals_per_sample_convolution(groups, kernel_size, kernel_num):
    torch.manual_seed(0)
    cin = cout = 8
    conv = ODConv2d(
        cin, cout, kernel_size, stride=2, padding=kernel_size // 2, groups=groups, kernel_num=kernel_num
    ).eval()
    for h, w in (
        (9, 7),
        (30, 23),
    ):  # small maps take the unfold + shared-GEMM path, large ones per-sample kernels
        x = torch.randn(3, cin, h, w)
        torch.testing.assert_close(conv(x), per_sample_reference(conv, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "groups,kernel_size,bias", [(1, 3, False), (1, 1, True), (16, 7, True), (1, 2, True)]
)
def test_kw_conv_forward_equals_per_sample_convolution(groups, kernel_size, bias):
    torch.manual_seed(0)
    manager = WarehouseManager(cell_num_ratio=2, sharing_range=("layer",))
    net = nn.Sequential(
        manager.reserve(
            16,
            16,
            kernel_size,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
            warehouse_name="stage0_layer0_conv0",
        ),
        manager.reserve(16, 32, 3, stride=2, padding=1, bias=False, warehouse_name="stage0_layer1_conv0"),
    )
    net.manager = manager
    manager.store()
    manager.allocate(net)
    net.eval()
    if bias:
        with torch.no_grad():
            net[0].bias.normal_()
    x = torch.randn(2, 16, 8, 6)
    for conv in (net[0], net[1]):
        torch.testing.assert_close(conv(x), per_sample_reference(conv, x), rtol=1e-4, atol=1e-5)
        x = conv(x)


def test_kw_resnet50_shares_one_warehouse_per_stage_with_handover():
    with torch.device("meta"):
        model = timm.create_model("dc_kw1x_resnet50")
        model4 = timm.create_model("dc_kw4x_resnet50")
    manager = model.warehouse_manager
    assert list(manager.layer_shapes) == [f"stage{s}_layer_conv" for s in range(4)]
    assert isinstance(model.layer1[0].conv1, nn.Conv2d) and isinstance(
        model.layer1[0].downsample[0], nn.Conv2d
    )
    # the first block of a stage (and its strided shortcut) draws from the previous stage's warehouse
    assert model.layer2[0].conv1.warehouse_id == 0 and model.layer2[0].downsample[0].warehouse_id == 0
    assert model.layer2[0].conv2.warehouse_id == 1 and model.layer2[1].conv1.warehouse_id == 1
    # 1x stores exactly the cells the layers need; 4x four times as many
    for wid, weight in enumerate(manager.weights):
        needed = sum(c.attention.num_mixtures for c in dynamic_convs(model) if c.warehouse_id == wid)
        assert weight.shape[0] == needed
        assert model4.warehouse_manager.weights[wid].shape[0] == 4 * needed
    # the layers' initial one-hot assignments cover every cell of their warehouse exactly once
    small = timm.create_model("dc_kw1x_resnet50", depth=[2, 2, 1, 1])
    for wid, weight in enumerate(small.warehouse_manager.weights):
        onehots = torch.cat(
            [
                c.attention.temp_bias.view(c.attention.num_mixtures, -1)[:, :-1]
                for c in dynamic_convs(small)
                if c.warehouse_id == wid
            ]
        )
        assert torch.equal(onehots.sum(0), torch.ones(weight.shape[0]))
        assert torch.equal(onehots.sum(1), torch.ones(onehots.shape[0]))


@pytest.mark.parametrize("arch", list(BASELINE_ARCHS))
def test_classifier_forward_backward_and_input_dependent_kernels(arch):
    torch.manual_seed(0)
    model = timm.create_model(f"dc_{arch}", num_classes=5, drop_path_rate=0.1, **tiny_overrides(arch))
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 5)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    convs = dynamic_convs(model)
    if BASELINE_ARCHS[arch]["conv_type"] == "plain":
        assert not convs and anneal_temperature(model, 0) is None
        return
    assert convs
    captured = {}  # train mode: batch statistics keep an untrained deep net's activations alive
    conv = convs[len(convs) // 2]
    conv.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0]))
    with torch.no_grad():
        model(x)
        k_a = conv.aggregated_weight(captured["x"])
        model(torch.randn(2, 3, 64, 64) * 3 + 1)
        k_b = conv.aggregated_weight(captured["x"])
    assert not torch.allclose(k_a, k_b, rtol=1e-3, atol=1e-5), "kernels do not depend on the input"
    assert not torch.allclose(k_a[0], k_a[1], rtol=1e-3, atol=1e-5), "samples of one batch share a kernel"


def test_kw_temperature_one_gives_static_kernels_and_zero_dynamic():
    torch.manual_seed(0)
    model = timm.create_model("dc_kw1x_mobilenetv2_100", num_classes=3, depth=[1] * 7).eval()
    conv = dynamic_convs(model)[3]
    x_a, x_b = torch.randn(2, conv.in_planes, 8, 8), torch.randn(2, conv.in_planes, 8, 8) * 2 + 1
    assert model.update_temperature(0, total_epochs=300) == 1.0  # start of the published schedule
    with torch.no_grad():
        torch.testing.assert_close(conv.aggregated_weight(x_a), conv.aggregated_weight(x_b))
    assert model.update_temperature(15) == 0.0
    with torch.no_grad():
        assert not torch.allclose(conv.aggregated_weight(x_a), conv.aggregated_weight(x_b))


def test_temperature_schedules_follow_the_published_recipes():
    assert [ODCONV_SCHEDULE.value(e) for e in (0, 5, 10, 50)] == [30.0, 15.5, 1.0, 1.0]
    assert [KW_SCHEDULE.value(e) for e in (0, 10, 20, 40)] == [1.0, 0.5, 0.0, 0.0]
    # a 4-epoch demo keeps the schedule's share of training (10 of 100 epochs -> 0.4 epochs)
    assert ODCONV_SCHEDULE.span(4) == pytest.approx(0.4)
    assert ODCONV_SCHEDULE.value(0, 4) == 30.0 and ODCONV_SCHEDULE.value(1, 4) == 1.0
    assert ODCONV_SCHEDULE.value(0.2, 4) == pytest.approx(15.5)


def test_anneal_temperature_reaches_every_dynamic_conv_through_wrappers_and_copies():
    model = timm.create_model("dc_odconv4x_resnet50", num_classes=3, depth=[1, 1, 1, 1])
    assert {c.attention.temperature for c in dynamic_convs(model)} == {1.0}  # built at the final value
    wrapped = nn.Sequential(model)
    assert anneal_temperature(wrapped, 2.5) == pytest.approx(1 + 29 * 0.75)
    assert {c.attention.temperature for c in dynamic_convs(model)} == {22.75}
    ema = copy.deepcopy(model)
    assert model.update_temperature(10) == 1.0
    assert {c.attention.temperature for c in dynamic_convs(ema)} == {22.75}
    assert set_temperature(ema, 1.0) == len(dynamic_convs(ema))


def test_every_registry_baseline_builds_with_timm_and_declares_its_pyramid():
    for arch in BASELINE_ARCHS:
        spec = resolve_model(arch)
        import_model_modules(spec)
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, num_classes=7, drop_path_rate=spec.drop_path_rate)
        assert model.pyramid_channels == spec.pyramid_channels() == PYRAMIDS[spec.family], arch
        assert model.get_classifier().out_features == 7
    model = timm.create_model(resolve_model("kw4x_mobilenetv2_100").timm_name, num_classes=4, depth=[1] * 7)
    feats = model.forward_pyramid(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 32, 96, 1280]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_bad_arguments_name_the_problem():
    with pytest.raises(TypeError, match="sub_depth"):
        timm.create_model("dc_resnet50", sub_depth=[1])
    with pytest.raises(ValueError, match="depth needs 7"):
        timm.create_model("dc_mobilenetv2_100", depth=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="plain or KW"):
        timm.create_model("dc_convnext_tiny", conv_type="odconv")
    with pytest.raises(ValueError, match="unknown model.arch 'odconv2x_resnet50'"):
        resolve_model("odconv2x_resnet50")


def test_checkpoint_roundtrip_and_official_key_names(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("dc_odconv4x_mobilenetv2_100", num_classes=6, depth=[1] * 7).eval()
    path = tmp_path / "final.pth"
    torch.save({"state_dict": model.state_dict(), "arch": "odconv4x_mobilenetv2_100"}, path)
    fresh = timm.create_model("dc_odconv4x_mobilenetv2_100", num_classes=6, depth=[1] * 7).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), model(x))
    # official release layout: DataParallel prefix and a Sequential(Dropout, Linear) classifier
    official = {
        "module." + k.replace("classifier.", "classifier.1."): v for k, v in model.state_dict().items()
    }
    fresh.load_state_dict(checkpoint_filter_fn(official, fresh))
    torch.testing.assert_close(fresh(x), model(x))
    assert "features.1.conv.0.0.attention.kernel_fc.weight" in model.state_dict()


@pytest.mark.parametrize("arch", ["odconv4x_mobilenetv2_100", "kw1x_mobilenetv2_100"])
def test_training_step_on_a_batch_of_one_uses_running_statistics(arch):
    model = timm.create_model(f"dc_{arch}", num_classes=3, depth=[1] * 7).train()
    model(torch.randn(1, 3, 64, 64)).sum().backward()  # a last batch of one must not break an epoch
    conv = dynamic_convs(model)[0]
    assert conv.attention.training and next(p.grad for p in conv.attention.parameters()) is not None


def test_pyramid_channels_follow_width_overrides():
    def baseline_pyramid_channels(arch, **overrides):
        return resolve_model(arch).pyramid_channels(overrides)

    assert baseline_pyramid_channels("kw1x_resnet50", embed_dim=[8, 16, 32, 64]) == (32, 64, 128, 256)
    assert baseline_pyramid_channels("odconv4x_mobilenetv2_100", width_mult=0.5) == (16, 16, 48, 1280)
    assert baseline_pyramid_channels("convnext_tiny") == PYRAMIDS["convnext"]


def test_ema_copy_of_a_kw_model_assembles_kernels_from_its_own_warehouse():
    from timm.utils import ModelEmaV3

    model = timm.create_model("dc_kw1x_resnet50", num_classes=3, depth=[1, 1, 1, 1])
    ema = ModelEmaV3(model, decay=0.5)
    convs = dynamic_convs(ema.module)
    assert convs and all(c._manager[0] is ema.module.warehouse_manager for c in convs)
    with torch.no_grad():
        model.warehouse_manager.weights[0].add_(1.0)  # a training step on the live model only
    x = torch.randn(2, convs[0].in_planes, 8, 8)
    assert not torch.allclose(convs[0].aggregated_weight(x), dynamic_convs(model)[0].aggregated_weight(x))


def test_pretrain_stage_builds_a_baseline_from_params():
    from overlock.params import ParamsError, parse_params
    from overlock.training.recipe import build_model

    params = parse_params({"model": {"arch": "odconv4x_resnet50", "overrides": {"depth": [1, 1, 1, 1]}}})
    model = build_model(params, num_classes=5)
    assert model.conv_type == "odconv" and model.kernel_num == 4
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ParamsError, match="odconv3x_resnet50"):
        parse_params({"model": {"arch": "odconv3x_resnet50"}})


def test_channels_last_speed_measurement_handles_5d_kernel_banks():
    """evaluate's channels_last throughput must not crash on ODConv's 5-D kernels (nn.Module.to refuses)."""
    import timm

    from overlock.evaluation.complexity import measure_speed
    model = timm.create_model("dc_odconv4x_resnet50", num_classes=3, depth=[1, 1, 1, 1])
    assert any(p.dim() == 5 for p in model.parameters())
    speed = measure_speed(model, 32, 2, 1, channels_last=True)
    assert speed["throughput"] > 0 and speed["channels_last"]
    conv4d = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv4d.is_contiguous(memory_format=torch.channels_last)
