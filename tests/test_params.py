"""params.yaml schema: the shipped file validates; bad keys/values fail naming the key and valid choices."""
import copy
from pathlib import Path

import pytest
import yaml

from overlock.params import ParamsError, load_params, parse_params
from overlock.registry import ARCH_NAMES, OVERLOCK_SIZES, resolve_model

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_match_schema_defaults():
    params = load_params(REPO / "params.yaml")
    # every key of params.yaml is in the schema and every schema field appears in params.yaml
    dumped = params.model_dump(mode="json")

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, v in d.items() if isinstance(v, dict) and v
                                          for x in keys(v, prefix + k + ".")}
    missing = {k for k in keys(dumped) if not k.startswith(("data.sources.", "model.overrides."))} - keys(RAW)
    assert not missing, f"schema fields missing from params.yaml: {sorted(missing)}"


@pytest.mark.parametrize("path,value,expect", [
    (("model", "size"), "q", "valid: xt, t, s, b"),
    (("model", "arch"), "vgg", "valid: overlock"),
    (("compute", "precision"), "fp8", "'fp32', 'bf16' or 'fp16'"),
    (("pretrain", "epochs"), 0, "greater than or equal to 1"),
    (("calibrate", "split"), "val", "evaluation split"),
    (("model", "overrides"), {"depht": [1, 1, 1, 1]}, "unknown model.overrides key(s) ['depht']"),
])
def test_bad_values_name_key_and_choices(path, value, expect):
    raw = copy.deepcopy(RAW)
    raw[path[0]][path[1]] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "params.yaml")
    text = str(err.value)
    assert ".".join(path) in text or path[0] in text
    assert expect in text


def test_unknown_key_is_rejected():
    raw = copy.deepcopy(RAW)
    raw["pretrain"]["epohcs"] = 3
    with pytest.raises(ParamsError, match=r"pretrain\.epohcs: unknown key"):
        parse_params(raw)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ParamsError, match="run from the repository root"):
        load_params(tmp_path / "params.yaml")


def test_section_hash_changes_only_with_its_sections():
    a = parse_params(RAW)
    raw = copy.deepcopy(RAW)
    raw["model"]["size"] = "s"
    b = parse_params(raw)
    assert a.section_hash("model") != b.section_hash("model")
    assert a.section_hash("data") == b.section_hash("data")


def test_registry_resolves_every_arch_and_size():
    assert set(OVERLOCK_SIZES) == {"xt", "t", "s", "b"}
    assert resolve_model("overlock", "t").pyramid_channels() == (64, 128, 384, 640)
    for arch in ARCH_NAMES:
        spec = resolve_model(arch, "xt")
        assert spec.arch == arch and spec.timm_name and spec.mmdet_backbone and spec.mmdet_adapter
    with pytest.raises(ValueError, match="valid: xt, t, s, b"):
        resolve_model("overlock", "xl")
