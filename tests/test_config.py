import pytest

from magnet.config import Config, ConfigError, load_config, parse_overrides


def test_overrides_nest_and_parse_yaml_values():
    overrides = ["train.lr=1e-4", "model.fusion.use_cam=false", "data.eval_splits=[val, testA]"]
    assert parse_overrides(overrides) == {
        "train": {"lr": 1e-4},
        "model": {"fusion": {"use_cam": False}},
        "data": {"eval_splits": ["val", "testA"]},
    }


def test_preset_by_name_and_override_applied():
    cfg = load_config("tiny", ["train.lr=0.001", "model.loss.lambda_mg=0.5"])
    assert cfg.name == "tiny"
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.model.loss.lambda_mg == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=-1", "train.lr"),
        ("model.decoder.kind=unet", "model.decoder.kind"),
        ("noequals", "section.key=value"),
        ("model.mask_grounding.replace_mask_prob=0.95", "replace_mask_prob"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("tiny", [override])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match=r"known presets: .*tiny"):
        load_config("no-such-preset")


def test_flat_has_dotted_leaves():
    flat = Config().flat()
    assert flat["model.vision.embed_dim"] == 128
    assert flat["train.lr"] == pytest.approx(5e-5)


def test_base_preset_is_merged_under_the_child(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nname: child\ntrain:\n  lr: 0.001\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model == load_config("tiny").model
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(loop)
